"""Fixtures of the ai-generator tests: one stand-in model process for the session, and
an in-process generator on a test's own topology."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import aio_pika
import pytest

from canvas_events.envelope import Envelope, utcnow
from canvas_events.events import GenerationRequested
from canvas_events.topology import Topology
from canvas_generator.service import Service
from canvas_generator.settings import Settings
from tests.support.fake_openai import FakeOpenAI

API_KEY = "sk-generator-tests-0123456789abcdef"


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    """The stand-in model, requiring API_KEY."""
    with FakeOpenAI(require_key=API_KEY) as fake:
        yield fake


def generator_settings(
    amqp_url: str, topology: Topology, fake: FakeOpenAI, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "amqp_topology_prefix": topology.prefix,
        "openai_api_key": API_KEY,
        "openai_base_url": fake.base_url,
        "openai_model": "gpt-4o-mini",
        "openai_timeout_seconds": 10,
        "max_concurrent_jobs": 4,
        "shutdown_grace_seconds": 10,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_generator(settings: Settings) -> AsyncIterator[Service]:
    """The generator's broker and worker, in this process, connected."""
    service = Service(settings)
    await service.start()
    try:
        await service.broker.wait_connected(15)
        yield service
    finally:
        await service.stop()


def generation_request(query: str, *, attempt: int = 1) -> Envelope:
    """A GenerationRequested envelope as the orchestrator's relay publishes it."""
    event = GenerationRequested(
        attempt_id=uuid.uuid4(),
        attempt=attempt,
        query=query,
        priority=5,
        lease_expires_at=utcnow() + timedelta(minutes=5),
    )
    return Envelope.wrap(
        event,
        correlation_id=f"test-{uuid.uuid4().hex[:12]}",
        job_id=uuid.uuid4(),
        user_id="user-1",
        canvas_id="canvas-1",
    )


class Bus:
    """The test's side of the broker: publishes work, sees every generator.* message."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, topology: Topology) -> None:
        self.connection = connection
        self.topology = topology
        self.seen: asyncio.Queue[Envelope] = asyncio.Queue()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def open(self) -> None:
        self._channel = await self.connection.channel(publisher_confirms=True)
        self._exchange = await self._channel.declare_exchange(
            self.topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self._exchange, routing_key="generator.#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.seen.put_nowait(Envelope.from_json(message.body))

        await queue.consume(on_message, no_ack=True)

    async def publish(
        self, envelope: Envelope, routing_key: str = "job.GenerationRequested"
    ) -> None:
        assert self._exchange is not None
        await self._exchange.publish(
            aio_pika.Message(envelope.to_json(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key,
        )

    async def publish_raw(self, body: bytes, routing_key: str = "job.GenerationRequested") -> None:
        assert self._exchange is not None
        await self._exchange.publish(aio_pika.Message(body), routing_key)

    async def next(self, timeout: float = 20.0) -> Envelope:
        """The next generator.* message (fails the test after ``timeout``)."""
        return await asyncio.wait_for(self.seen.get(), timeout)

    async def results(
        self, *requests: Envelope, timeout: float = 20.0
    ) -> dict[str, list[Envelope]]:
        """Every message caused by ``requests`` until each has a final result, by job_id."""
        by_job: dict[str, list[Envelope]] = {str(r.job_id): [] for r in requests}
        finals = {"GenerationSucceeded", "GenerationFailed"}

        async def gather() -> None:
            while not all(any(e.type in finals for e in got) for got in by_job.values()):
                envelope = await self.seen.get()
                by_job.setdefault(str(envelope.job_id), []).append(envelope)

        await asyncio.wait_for(gather(), timeout)
        return by_job

    async def queue_depth(self, name: str) -> int:
        """Messages ready in queue ``name``."""
        assert self._channel is not None
        queue = await self._channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


@pytest.fixture
async def bus(amqp_url: str, topology: Topology) -> AsyncIterator[Bus]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        bus = Bus(connection, topology)
        await bus.open()
        yield bus


async def wait_until(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``condition`` (a function, sync or async, returning a truth value) until it
    holds; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        await asyncio.sleep(0.02)
