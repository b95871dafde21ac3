"""Fixtures of the orchestrator's tests: a migrated pool on the test's own database, the
test's side of the broker, and orchestrators running in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from canvas_orchestrator.service import Service
from canvas_store.connections import create_pool
from canvas_store.migrations import migrate_pool
from tests.orchestrator.harness import Bus, settings_for, start_service

Start = Callable[..., Awaitable[Service]]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh database with the orchestrator's schema applied."""
    pool = await create_pool(database_url, max_size=12)
    await migrate_pool(pool)
    yield pool
    await pool.close()


@pytest.fixture
async def bus(amqp_url, topology) -> AsyncIterator[Bus]:
    """Publishes like the gateway and the generators; records every job.* message."""
    bus = Bus(amqp_url, topology)
    await bus.start()
    yield bus
    await bus.stop()


@pytest.fixture
async def start(database_url, amqp_url, topology) -> AsyncIterator[Start]:
    """Starts orchestrators in-process (settings overridable); stops them afterwards."""
    services: list[Service] = []

    async def start(**overrides: Any) -> Service:
        service = await start_service(settings_for(database_url, amqp_url, topology, **overrides))
        services.append(service)
        return service

    yield start
    for service in services:
        await service.stop()
