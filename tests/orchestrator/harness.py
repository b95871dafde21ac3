"""Running the orchestrator in-process against the test's database and topology, and
watching what it publishes."""

from __future__ import annotations

from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from canvas_events.auth import ServiceCredential
from canvas_events.topology import Topology
from canvas_orchestrator.service import Service
from canvas_orchestrator.settings import Settings
from tests.support.bus import Bus as SharedBus
from tests.support.bus import Seen as Seen  # re-exported for the tests
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


class Bus(SharedBus):
    """The test's side of the broker (tests/support/bus.py): publishes like the gateway
    and the generators, and records every ``job.*`` message, listed in ``seen``."""

    def __init__(self, amqp_url: str, topology: Topology) -> None:
        super().__init__(amqp_url, topology, listen="job.#")

    @property
    def seen(self) -> list[Seen]:
        return self.messages


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
