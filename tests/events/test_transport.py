"""The coalescing socket writer under our AMQP connections (canvas_events.transport):
what one turn of the loop writes leaves in one write, in order; a drain, close or EOF
writes what is buffered first. Then, on the real RabbitMQ, that aio-pika and aiormq
still carry every frame of the Broker through it (an upgrade that stops passing our
transport factory down fails here), and that publishes made together share writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from canvas_events.broker import Broker
from canvas_events.topology import Topology, routing_key
from canvas_events.transport import (
    FLUSH_BYTES,
    WRITE_QUEUE_FRAMES,
    CoalescingConnection,
    CoalescingWriter,
)
from tests.events.memory import job_requested


class Peer:
    """A local TCP server that keeps everything it receives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            self.received += chunk
        self.closed.set()
        writer.close()


@pytest.fixture
async def peer() -> AsyncIterator[tuple[Peer, CoalescingWriter]]:
    """A peer, and a coalescing writer connected to it (closed after the test)."""
    got = Peer()
    server = await asyncio.start_server(got.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, inner = await asyncio.open_connection("127.0.0.1", port)
    writer = CoalescingWriter(inner, reader, asyncio.get_running_loop())
    yield got, writer
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def test_writes_of_one_turn_reach_the_transport_as_one_write_in_order(
    peer: tuple[Peer, CoalescingWriter],
) -> None:
    got, writer = peer
    for index in range(5):
        writer.write(b"frame%d;" % index)
    assert writer.writes == 0  # not before the turn ends
    await asyncio.sleep(0)
    assert (writer.chunks, writer.writes) == (5, 1)
    writer.write(b"next;")
    await asyncio.sleep(0)
    assert (writer.chunks, writer.writes) == (6, 2)
    writer.close()
    await got.closed.wait()
    assert bytes(got.received) == b"frame0;frame1;frame2;frame3;frame4;next;"


async def test_drain_close_and_large_writes_do_not_wait_for_the_turn(
    peer: tuple[Peer, CoalescingWriter],
) -> None:
    got, writer = peer
    writer.write(b"a")
    await writer.drain()
    assert writer.writes == 1
    writer.write(b"b")
    big = b"x" * FLUSH_BYTES
    writer.write(big)  # past FLUSH_BYTES: out at once, after what came before it
    assert writer.writes == 2
    writer.write(b"c")
    await writer.writable()  # waits for room, writes nothing
    assert writer.writes == 2
    writer.write_eof()  # what is buffered goes first
    assert writer.writes == 3
    await got.closed.wait()
    assert bytes(got.received) == b"ab" + big + b"c"


async def test_the_brokers_frames_go_through_the_coalescing_writer_and_share_writes(
    amqp_url: str, topology: Topology
) -> None:
    broker = Broker(amqp_url, topology, connection_name="test-transport")
    await broker.start()
    try:
        await broker.wait_connected(10)
        writer = broker.writer
        assert isinstance(writer, CoalescingWriter)
        connection = broker._connection
        assert connection is not None
        assert connection.transport is not None
        assert connection.transport.connection.write_queue.maxsize == WRITE_QUEUE_FRAMES
        # The handshake, declarations and channels already went through it.
        assert writer.chunks > 0
        before = (writer.chunks, writer.writes)
        key = routing_key("gateway", "JobRequested")
        await asyncio.gather(*(broker.publish(job_requested(), key) for _ in range(50)))
        chunks, writes = writer.chunks - before[0], writer.writes - before[1]
        assert chunks >= 50  # every publish, confirmed, went through it
        # Published together, they shared writes (one write per publish before).
        assert writes <= chunks // 10, (chunks, writes)
    finally:
        await broker.stop()


async def test_aio_pika_passes_our_transport_factory_down_to_aiormq() -> None:
    # Async: aio-pika's Connection takes the current event loop when made, and a plain
    # test has none unless an earlier test of its process happened to leave one.
    connection = CoalescingConnection("amqp://guest:guest@127.0.0.1/")
    assert connection.kwargs["transport_factory"] is connection.transport_factory
    assert connection.writer is None
