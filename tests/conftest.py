"""Fixtures for tests that cross a process boundary: each test gets its own database
and its own exchange and queue names on the real PostgreSQL and RabbitMQ, and they are
removed afterwards. Before any test, tests/support/backing.py finds those two servers
(DATABASE_URL / AMQP_URL, else the local defaults, else containers), or ends the run
saying why it cannot."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from canvas_events.topology import Topology
from tests.support import backing
from tests.support.env import amqp_url as _amqp_url
from tests.support.env import create_database, drop_database
from tests.support.env import database_url as _database_url

_BACKINGS = pytest.StashKey[contextlib.ExitStack]()


def pytest_configure(config: pytest.Config) -> None:
    """Find (or start) PostgreSQL and RabbitMQ before any test, for the whole run."""
    if config.option.help or config.option.version:
        return
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(backing.provided())
    except backing.Unavailable as exc:
        pytest.exit(f"cannot run the tests: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)
    config.stash[_BACKINGS] = stack


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the containers started for the run, if any."""
    stack = config.stash.get(_BACKINGS, None)
    if stack is not None:
        stack.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The broker every test uses."""
    return _amqp_url()


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    url = _database_url(f"cj_test_{uuid.uuid4().hex[:12]}")
    await create_database(url)
    yield url
    await drop_database(url)


@pytest.fixture
async def topology(amqp_url: str) -> AsyncIterator[Topology]:
    """Exchange and queue names of their own for one test; deleted afterwards."""
    topo = Topology(prefix=f"t{uuid.uuid4().hex[:10]}")
    yield topo
    await delete_topology(amqp_url, topo)


async def delete_topology(url: str, topo: Topology) -> None:
    """Delete every durable queue and exchange of ``topo`` (per-process queues go by
    themselves when their connection closes)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        names = [spec.name for spec in topo.durable_queues] + list(topo.dead_letter_queues)
        for name in names:
            await channel.queue_delete(name)
        for name in (topo.exchange, topo.dead_letter_exchange):
            await channel.exchange_delete(name)
