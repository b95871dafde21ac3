"""Builders and helpers for the notifier's tests: recorded envelopes, event-store rows,
a running notifier, a publisher that plays the orchestrator's relay."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import aio_pika
import asyncpg
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from canvas_events.auth import mint_token
from canvas_events.envelope import Envelope
from canvas_events.events import (
    Event,
    GenerationProgressed,
    GenerationRequested,
    GenerationStarted,
    GenerationSucceeded,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobRetryScheduled,
)
from canvas_events.topology import JOB, Topology, routing_key
from canvas_notifier.service import Notifier
from canvas_notifier.settings import Settings
from tests.support.processes import free_port as free_port  # re-exported for the tests
from tests.support.schema import apply_orchestrator_schema
from tests.support.waiting import eventually

SECRET = "notifier-tests-secret-0123456789-abcdefghijklmnop"
ATTEMPT = UUID("00000000-0000-4000-8000-000000000001")
OCCURRED = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


# -- events ------------------------------------------------------------------------------


def queued(priority: int = 5, retry_count: int = 0) -> JobQueued:
    return JobQueued(priority=priority, retry_count=retry_count)


def requested() -> GenerationRequested:
    return GenerationRequested(
        attempt_id=ATTEMPT,
        attempt=1,
        query="a flowchart",
        priority=5,
        lease_expires_at=OCCURRED + timedelta(minutes=5),
    )


def started() -> GenerationStarted:
    return GenerationStarted(attempt_id=ATTEMPT, model="stand-in", generator_id="gen-1")


def progressed(index: int = 0, text: str = "hello") -> GenerationProgressed:
    return GenerationProgressed(
        attempt_id=ATTEMPT,
        index=index,
        object={"type": "text", "x": 1, "y": 2, "text": text},
    )


def succeeded() -> GenerationSucceeded:
    return GenerationSucceeded(
        attempt_id=ATTEMPT,
        objects=[{"type": "circle", "x": 0, "y": 0, "radius": 5}],
        dropped_objects=0,
        model="stand-in",
        latency_ms=12,
    )


def completed() -> JobCompleted:
    return JobCompleted(
        object_count=1,
        object_ids=["o-1"],
        dropped_objects=1,
        model="stand-in",
        usage={"prompt_tokens": 10, "completion_tokens": 20},
        latency_ms=12,
    )


def retry_scheduled() -> JobRetryScheduled:
    return JobRetryScheduled(
        retry_count=1, next_attempt_at=OCCURRED + timedelta(minutes=2), error="model timed out"
    )


def failed() -> JobFailed:
    return JobFailed(error="invalid API key", retry_count=0)


def cancelled() -> JobCancelled:
    return JobCancelled(reason="user asked")


def recorded(
    event: Event,
    *,
    position: int,
    user_id: str,
    job_id: UUID | None = None,
    canvas_id: str | None = "canvas-1",
) -> Envelope:
    """An envelope as the orchestrator's relay publishes it: recorded, with a position."""
    envelope = Envelope.wrap(
        event,
        correlation_id="corr-notifier-test",
        job_id=job_id or UUID(int=1),
        user_id=user_id,
        canvas_id=canvas_id,
    )
    return envelope.model_copy(update={"position": position, "occurred_at": OCCURRED})


# -- the database ------------------------------------------------------------------------

apply_schema = apply_orchestrator_schema  # the name the notifier's tests know it by


async def insert_events(database_url: str, envelopes: list[Envelope]) -> None:
    """Rows of the events table with the envelopes' own positions."""
    conn = await asyncpg.connect(database_url)
    try:
        await insert_events_in(conn, envelopes)
    finally:
        await conn.close()


async def insert_events_in(conn: Any, envelopes: list[Envelope]) -> None:
    """:func:`insert_events` on an open connection (inside its transaction, if any)."""
    await conn.executemany(
        """
        INSERT INTO events (stream_id, version, position, event_id, type, schema_version,
                            occurred_at, correlation_id, causation_id, user_id, canvas_id, data)
        OVERRIDING SYSTEM VALUE
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb)
        """,
        [
            (
                e.job_id,
                e.position,  # unique per stream is all the key asks
                e.position,
                e.event_id,
                e.type,
                e.schema_version,
                e.occurred_at,
                e.correlation_id,
                e.causation_id,
                e.user_id,
                e.canvas_id,
                orjson.dumps(e.data).decode(),
            )
            for e in envelopes
        ],
    )


async def insert_job(database_url: str, job_id: UUID, user_id: str, canvas_id: str) -> None:
    """A jobs row and its canvas, as the orchestrator's projection writes them."""
    conn = await asyncpg.connect(database_url)
    try:
        now = datetime.now(UTC)
        await conn.execute(
            """
            INSERT INTO jobs (id, user_id, canvas_id, query, priority, status, created_at,
                              updated_at, version, last_position)
            VALUES ($1, $2, $3, 'a drawing', 5, 'queued', $4, $4, 1, 1)
            """,
            job_id,
            user_id,
            canvas_id,
            now,
        )
        await conn.execute(
            "INSERT INTO canvases (id, user_id, created_at) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            canvas_id,
            user_id,
            now,
        )
    finally:
        await conn.close()


# -- processes ---------------------------------------------------------------------------


def settings_for(
    database_url: str, amqp_url: str, topology: Topology, **overrides: Any
) -> Settings:
    return Settings(
        database_url=database_url,
        amqp_url=amqp_url,
        amqp_topology_prefix=topology.prefix,
        jwt_secret=SECRET,
        **overrides,
    )


@asynccontextmanager
async def running(settings: Settings, *, wait: bool = True) -> AsyncIterator[Notifier]:
    """A notifier in this process on a free port; connected when ``wait``."""
    notifier = Notifier(settings, host="127.0.0.1", port=0)
    await notifier.start()
    try:
        if wait:
            await notifier.database.wait_ready(10)
            await notifier.broker.wait_connected(10)
        yield notifier
    finally:
        await notifier.stop()


class Relay:
    """Publishes recorded envelopes the way the orchestrator's relay does."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
        self._channel = channel
        self._topology = topology

    async def publish(self, *envelopes: Envelope) -> None:
        exchange = await self._channel.get_exchange(self._topology.exchange)
        for envelope in envelopes:
            await exchange.publish(
                aio_pika.Message(envelope.to_json(), content_type="application/json"),
                routing_key(JOB, envelope.type),
            )


@asynccontextmanager
async def relay(amqp_url: str, topology: Topology) -> AsyncIterator[Relay]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield Relay(channel, topology)


# -- waiting -----------------------------------------------------------------------------


async def live(notifier: Notifier, user_id: str, count: int = 1) -> None:
    """Wait until ``count`` connections of ``user_id`` are registered and past their replay."""
    await eventually(
        lambda: sum(not c.holding for c in notifier.hub.clients(user_id)) >= count,
        timeout=10,
        interval=0.01,
        what=f"{count} live connections of {user_id}",
    )


async def receive(ws: ClientConnection, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next ``count`` frames, parsed."""
    frames = []
    async with asyncio.timeout(timeout):
        for _ in range(count):
            frames.append(orjson.loads(await ws.recv()))
    return frames


async def positions(ws: ClientConnection, count: int, timeout: float = 10.0) -> list[int]:
    """The positions of the next ``count`` frames."""
    return [frame["position"] for frame in await receive(ws, count, timeout)]


async def closed_code(ws: ClientConnection, timeout: float = 15.0) -> int | None:
    """Read until the connection closes; the close code the server sent."""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
    return ws.close_code


def ws_url(notifier: Notifier, query: str) -> str:
    return f"ws://127.0.0.1:{notifier.port}/ws?{query}"


@asynccontextmanager
async def live_socket(
    notifier: Notifier, user_id: str, query: str = "", **options: Any
) -> AsyncIterator[ClientConnection]:
    """A WebSocket of ``user_id`` (its token, then ``query``, in the query string) once it
    is live: registered and past its replay. ``options`` go to ``connect``."""
    token = mint_token(user_id, SECRET)
    async with connect(ws_url(notifier, f"token={token}{query}"), **options) as ws:
        await live(notifier, user_id)
        yield ws


# -- a WebSocket client by hand ------------------------------------------------------------

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


class RawClient:
    """A WebSocket client written by hand on a plain socket, for what the ``websockets``
    client never does: leave everything unread, or read but never answer a ping."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, query: str, *, receive_buffer: int | None = None
    ) -> RawClient:
        """Open the connection and complete the handshake. With ``receive_buffer`` the
        socket's receive buffer is that small and this side buffers at most a few KiB,
        so that a client that stops reading fills its TCP window soon."""
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2048)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        async with asyncio.timeout(10):
            response = await reader.readuntil(b"\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 101 "), response
        return cls(reader, writer)

    async def read_frame(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload). Server frames are never masked."""
        head = await self.reader.readexactly(2)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        return head[0] & 0x0F, await self.reader.readexactly(length)

    async def close_code(self, *, timeout: float = 15.0) -> tuple[int, list[int]]:
        """Read (never answering a ping) until the server's close frame: its code, and
        the opcodes of every frame before it."""
        opcodes: list[int] = []
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await self.read_frame()
                if opcode == CLOSE:
                    return int.from_bytes(payload[:2], "big"), opcodes
                opcodes.append(opcode)

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake."""
        self.writer.transport.abort()
