"""Running the orchestrator in-process against the test's database and topology, and
watching what it publishes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID, uuid4

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.auth import ServiceCredential
from canvas_events.broker import Broker
from canvas_events.envelope import Envelope
from canvas_events.events import Event, JobRequested
from canvas_events.topology import GATEWAY, GENERATOR, Topology, routing_key
from canvas_orchestrator.service import Service
from canvas_orchestrator.settings import Settings
from tests.support.waiting import eventually as eventually  # re-exported for the tests

T = TypeVar("T")

JWT_SECRET = "orchestrator-tests-secret-0123456789-abcdefgh"


def service_headers() -> dict[str, str]:
    """The credential the orchestrator's internal API asks for."""
    return ServiceCredential("tests", JWT_SECRET).headers()


def settings_for(
    database_url: str, amqp_url: str, topology: Topology, **overrides: Any
) -> Settings:
    """Settings for an in-process orchestrator; fast timers, no model timeout to check."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "amqp_url": amqp_url,
        "amqp_topology_prefix": topology.prefix,
        "jwt_secret": JWT_SECRET,
        "timer_interval_seconds": 0.05,
        "openai_timeout_seconds": None,
        "shutdown_grace_seconds": 5,
    }
    values.update(overrides)
    return Settings(**values)


async def start_service(settings: Settings) -> Service:
    """An orchestrator whose database and broker connections are up."""
    service = Service(settings, relay_poll_interval=0.2)
    await service.start()
    await service.database.wait_ready(15)
    await service.broker.wait_connected(15)
    await service.publisher.wait_connected(15)
    return service


@dataclass
class Seen:
    """One message the orchestrator published."""

    routing_key: str
    priority: int | None
    envelope: Envelope


class Bus:
    """The test's side of the broker: publishes like the gateway and the generators, and
    records every ``job.*`` message on a queue of its own."""

    def __init__(self, amqp_url: str, topology: Topology) -> None:
        self._url = amqp_url
        self.topology = topology
        self.seen: list[Seen] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.publisher = Broker(amqp_url, topology, connection_name=f"test-{uuid4().hex[:6]}")

    async def start(self) -> None:
        await self.publisher.start()
        await self.publisher.wait_connected(15)
        self._connection = await aio_pika.connect_robust(self._url)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self.topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="job.#")
        await queue.consume(self._on_message, no_ack=True)

    async def stop(self) -> None:
        await self.publisher.stop()
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        envelope = Envelope.from_json(message.body)
        self.seen.append(Seen(message.routing_key or "", message.priority, envelope))

    async def publish(self, envelope: Envelope, source: str) -> None:
        await self.publisher.publish(envelope, routing_key(source, envelope.type))

    async def request(
        self,
        *,
        user_id: str = "alice",
        canvas_id: str | None = None,
        priority: int = 5,
        query: str = "a login flowchart",
        job_id: UUID | None = None,
    ) -> Envelope:
        """Publish a JobRequested as the gateway does; return its envelope."""
        canvas_id = canvas_id or f"canvas-{uuid4().hex[:8]}"
        envelope = Envelope.wrap(
            JobRequested(query=query, canvas_id=canvas_id, priority=priority),
            correlation_id=f"req-{uuid4().hex[:8]}",
            job_id=job_id or uuid4(),
            user_id=user_id,
            canvas_id=canvas_id,
        )
        await self.publish(envelope, GATEWAY)
        return envelope

    async def reply(self, requested: Envelope, event: Event) -> Envelope:
        """Publish ``event`` as a generator answering ``requested``."""
        envelope = requested.follow(event)
        await self.publish(envelope, GENERATOR)
        return envelope

    def of(self, job_id: UUID, event_type: str | None = None) -> list[Seen]:
        return [
            seen
            for seen in self.seen
            if seen.envelope.job_id == job_id
            and (event_type is None or seen.envelope.type == event_type)
        ]

    async def wait_for(self, job_id: UUID, event_type: str, count: int = 1) -> list[Seen]:
        """The first ``count`` published events of that type for the job."""

        async def check() -> list[Seen] | None:
            found = self.of(job_id, event_type)
            return found[:count] if len(found) >= count else None

        return await eventually(check, what=f"{count} x job.{event_type} of {job_id}")


async def job_row(service: Service, job_id: UUID) -> asyncpg.Record | None:
    return await service.database.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)


async def stream_types(service: Service, job_id: UUID) -> list[str]:
    rows = await service.database.pool.fetch(
        "SELECT type FROM events WHERE stream_id = $1 ORDER BY version", job_id
    )
    return [row["type"] for row in rows]


async def wait_status(service: Service, job_id: UUID, status: str) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await job_row(service, job_id)
        return row if row is not None and row["status"] == status else None

    return await eventually(check, what=f"job {job_id} {status}")


def metric(service: Service, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0
