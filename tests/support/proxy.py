"""A TCP proxy in the test's own process, between a service and a server: it can make
the server's answers late, or cut one process off from the server while the others
still reach it (every connection dropped, new ones refused, until restored). The shared
servers themselves are never touched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit


class Proxy:
    """A TCP proxy in the test's process, between a service and a server: it can make
    the server's answers late (``delay`` seconds on each chunk back), or cut every
    connection and refuse new ones until :meth:`restore`, as an outage looks from the
    service's side. The shared servers themselves are never touched."""

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        self.host = host
        self.target_port = port
        self.delay = delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut = False
        # Connections turned away while cut: proof that the service tried meanwhile.
        self.refused = 0
        # Connections passed on to the server: how often the service connected.
        self.accepted = 0

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def url(self, url: str) -> str:
        """``url`` (postgresql://, amqp://) pointed at this proxy instead of the server."""
        parts = urlsplit(url)
        credentials, _, _ = parts.netloc.rpartition("@")
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=f"{credentials}@{host}" if credentials else host))

    def cut(self) -> None:
        """Drop every connection (no goodbye on either side) and refuse new ones."""
        self._cut = True
        for writer in list(self._open):
            writer.transport.abort()

    def restore(self) -> None:
        """Accept connections again."""
        self._cut = False

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._open |= {writer, up_writer}
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer, 0.0)),
            asyncio.create_task(self._pipe(up_reader, writer, self.delay)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open.discard(writer)
            writer.transport.abort()


async def open_proxy(url: str, *, delay: float = 0.0) -> Proxy:
    """A started :class:`Proxy` to the server of ``url``; stop it when done."""
    parts = urlsplit(url)
    port = parts.port or {"postgresql": 5432, "postgres": 5432, "amqp": 5672}[parts.scheme]
    return await Proxy(parts.hostname or "127.0.0.1", port, delay=delay).start()


@asynccontextmanager
async def proxy(url: str, *, delay: float = 0.0) -> AsyncIterator[Proxy]:
    """A :class:`Proxy` to the server of ``url``, for the length of the block."""
    started = await open_proxy(url, delay=delay)
    try:
        yield started
    finally:
        await started.stop()
