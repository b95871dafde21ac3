"""A real gateway for one test: served by uvicorn in this process on a free port,
against the test's own database (with the orchestrator's schema applied) and topology."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import httpx
import orjson
import pytest

from canvas_events.auth import mint_token
from canvas_events.envelope import Envelope
from canvas_events.topology import Topology
from canvas_gateway.service import serve
from canvas_gateway.settings import Settings
from tests.support.processes import free_port
from tests.support.schema import apply_orchestrator_schema
from tests.support.waiting import eventually

JWT_SECRET = "gateway-tests-secret-0123456789-abcdefghijklmnop"
DEADLINE_SECONDS = 15.0


def token(user: str, *, admin: bool = False) -> dict[str, str]:
    """Authorization headers for ``user``."""
    return {"Authorization": f"Bearer {mint_token(user, JWT_SECRET, admin=admin)}"}


@dataclass
class Gateway:
    client: httpx.AsyncClient
    settings: Settings
    database_url: str

    async def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def create(self, user: str = "alice", **body: Any) -> httpx.Response:
        headers = {**token(user), **body.pop("headers", {})}
        return await self.client.post(
            "/api/ai-agent/create-canvas",
            json={"query": "a flowchart of a login process", **body},
            headers=headers,
        )

    async def insert_job(self, user: str, **fields: Any) -> uuid.UUID:
        """A jobs read-model row, as the orchestrator would project it."""
        now = datetime.now(UTC)
        row: dict[str, Any] = {
            "id": uuid.uuid4(),
            "user_id": user,
            "canvas_id": f"canvas-{uuid.uuid4().hex[:8]}",
            "query": "something",
            "priority": 5,
            "status": "queued",
            "created_at": now,
            "updated_at": now,
            "version": 2,
            "last_position": 2,
            **fields,
        }
        if isinstance(row.get("result"), dict):
            row["result"] = orjson.dumps(row["result"]).decode()
        columns = ", ".join(row)
        params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
        await self.sql(f"INSERT INTO jobs ({columns}) VALUES ({params})", *row.values())
        return uuid.UUID(str(row["id"]))


def gateway_settings(
    database_url: str, amqp_url: str, topology: Topology, **extra: Any
) -> Settings:
    return Settings(
        database_url=database_url,
        amqp_url=amqp_url,
        amqp_topology_prefix=topology.prefix,
        jwt_secret=JWT_SECRET,
        publish_timeout_seconds=2.0,
        **extra,
    )


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, database_url: str, *, wait_ready: bool = True
) -> AsyncIterator[Gateway]:
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, host="127.0.0.1", port=port))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def up() -> bool:
                if task.done():
                    task.result()  # raise what stopped it
                try:
                    response = await client.get("/ready" if wait_ready else "/health")
                except httpx.TransportError:
                    return False
                return response.status_code == 200

            await eventually(up, timeout=DEADLINE_SECONDS, what="the gateway to answer")
            yield Gateway(client, settings, database_url)
    finally:
        stop.set()
        await task


@pytest.fixture
def make_gateway(
    database_url: str, amqp_url: str, topology: Topology
) -> Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]:
    """A gateway with settings of the test's choosing (the orchestrator's schema applied)."""

    @contextlib.asynccontextmanager
    async def make(**extra: Any) -> AsyncIterator[Gateway]:
        await apply_orchestrator_schema(database_url)
        settings = gateway_settings(database_url, amqp_url, topology, **extra)
        async with running_gateway(settings, database_url) as gateway:
            yield gateway

    return make


@pytest.fixture
async def gateway(make_gateway: Callable[..., Any]) -> AsyncIterator[Gateway]:
    async with make_gateway() as running:
        yield running


@pytest.fixture
async def orchestrator_queue(
    amqp_url: str, topology: Topology
) -> AsyncIterator[Callable[[], Awaitable[tuple[str, Envelope]]]]:
    """Take the next message off the orchestrator's queue: (routing key, envelope)."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()

    async def take() -> tuple[str, Envelope]:
        queue = await channel.declare_queue(topology.orchestrator.name, passive=True)

        async def get() -> aio_pika.abc.AbstractIncomingMessage | None:
            return await queue.get(no_ack=True, fail=False)

        message = await eventually(
            get, timeout=DEADLINE_SECONDS, what="a message on the orchestrator queue"
        )
        return message.routing_key or "", Envelope.from_json(message.body)

    try:
        yield take
    finally:
        await connection.close()
