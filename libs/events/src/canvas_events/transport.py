"""The socket under our AMQP connections: frames written in the same turn of the event
loop leave in one ``write``.

aiormq's writer task takes one queued frame at a time and writes it on its own: a
publish (method, header and body, marshalled together), an ack, a heartbeat, each a
``send`` of its own. Under load the orchestrator and the generator publish from dozens
of tasks at once and ack on several channels, and those sends were a tenth of their CPU
(py-spy on the 0 ms bench, docs/benchmarks.md). :class:`CoalescingWriter` keeps what is
written during one turn of the loop and hands it to the transport as one write at the
start of the next (``loop.call_soon``): nothing waits longer than that turn.

Order is kept (one buffer, written in order); a ``drain()`` (aiormq drains after a frame
that someone waits on: RPCs, a publish with ``wait=True``, the connection's close), a
``close()`` or ``write_eof()`` writes what is buffered first, so every frame that aiormq
drained has reached the transport when its drain returns, as before.

How it is plugged in, with no patching: aiormq's ``Connection`` takes a
``transport_factory`` (its own hook for what carries the frames), and
:class:`CoalescingConnection` is aio-pika's connection passing ours down (aio-pika hands
its ``kwargs`` to ``aiormq.connect``). tests/events/test_transport.py fails loudly if an
upgrade of either stops routing the frames through this writer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

import aio_pika
from aiormq.abc import TimeoutType
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory

if TYPE_CHECKING:
    from yarl import URL

# Frames aiormq's connection may queue for its writer task (aiormq's own bound is 10).
# With ten, the eleventh publish of a burst waits in the queue holding its channel's
# lock, the rest queue behind that lock, and from then on one publish is queued per
# turn of the loop: one write each again. Room for a burst keeps them together; the
# bound on what waits to be written is the publishers' own (they wait for room on the
# socket first, CoalescingWriter.writable) and the consumers' prefetch (acks).
WRITE_QUEUE_FRAMES: Final = 1024
# Buffered bytes past which a write goes out at once instead of at the end of the turn
# (a large body gains nothing from waiting, and the buffer stays small).
FLUSH_BYTES: Final = 64 * 1024


class CoalescingWriter(asyncio.StreamWriter):
    """A stream writer whose writes of one loop turn reach the transport as one write
    (see the module docstring). Counts what it was given and what it wrote."""

    def __init__(
        self,
        inner: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        transport = inner.transport
        super().__init__(transport, transport.get_protocol(), reader, loop)
        # Kept alive: a StreamWriter that is collected closes its transport.
        self._inner = inner
        self._flush_loop = loop
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        # Writes asked for, and writes made on the transport.
        self.chunks = 0
        self.writes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.chunks += 1
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self._flush_loop.call_soon(self.flush)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """Hand what is buffered to the transport now (one write)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if self.transport.is_closing():
            # The transport would drop it too (the connection is going or gone).
            return
        self.writes += 1
        self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    async def drain(self) -> None:
        """Write what is buffered, then wait as :meth:`asyncio.StreamWriter.drain` does."""
        self.flush()
        await super().drain()

    async def writable(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (the broker
        reads slower than we write), without writing what is buffered: backpressure for
        a publisher whose frames are queued without a drain of their own. Raises a
        ``ConnectionError`` (or the error that closed the connection) once it is lost."""
        await super().drain()

    def write_eof(self) -> None:
        self.flush()
        super().write_eof()

    def close(self) -> None:
        self.flush()
        super().close()


class CoalescingTransportFactory(TransportFactory):
    """aiormq's TCP or TLS transport (by the URL's scheme, as aiormq picks it), written
    through a :class:`CoalescingWriter`; ``writer`` is the last one made."""

    def __init__(self) -> None:
        self.writer: CoalescingWriter | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        inner = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await inner.create(url, **kwargs)
        self.writer = CoalescingWriter(writer, reader, asyncio.get_running_loop())
        return reader, self.writer


class CoalescingConnection(aio_pika.Connection):
    """aio-pika's connection on a :class:`CoalescingTransportFactory` (pass it as
    ``aio_pika.connect(..., connection_class=CoalescingConnection)``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transport_factory = CoalescingTransportFactory()
        # aio-pika passes these to aiormq.connect(), and on to aiormq's Connection.
        self.kwargs["transport_factory"] = self.transport_factory

    async def connect(self, timeout: TimeoutType = None) -> None:
        await super().connect(timeout)
        assert self.transport is not None
        # The queue is aiormq's (its writer task and every channel share it); asyncio's
        # Queue reads its bound from here on each put. tests/events/test_transport.py
        # checks that it took.
        queue = self.transport.connection.write_queue
        queue._maxsize = WRITE_QUEUE_FRAMES  # type: ignore[attr-defined]

    @property
    def writer(self) -> CoalescingWriter | None:
        """The writer of the current socket (None before the first connect)."""
        return self.transport_factory.writer
