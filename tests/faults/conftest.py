"""Fixtures of the fault tests: a whole system of real processes per test (its own
database and topology prefix, settings of the test's choosing), and private RabbitMQ and
PostgreSQL servers for the tests that restart them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from canvas_events.topology import Topology
from tests.conftest import delete_topology
from tests.support.env import amqp_url, create_database, database_url, drop_database, with_database
from tests.support.servers import PrivatePostgres, PrivateRabbitMQ
from tests.support.system import System

# The harness asserts on the tests' behalf (assert_completed, restart_mid_run): pytest
# explains those failures as it does the tests' own asserts.
pytest.register_assert_rewrite("tests.faults.harness")

MakeSystem = Callable[..., Awaitable[System]]

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every fault test starts the services as real processes: marked ``e2e`` here, once."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


# Settings every fault system starts with; a test overrides what it is about.
DEFAULTS: dict[str, str] = {
    # One user submits every job of a test: the per-user limit is not what is tested.
    "MAX_ACTIVE_JOBS_PER_USER": "1000",
    # Crashes may cost an attempt (a lease that expires), which must be retried.
    "MAX_JOB_RETRIES": "5",
    "RETRY_BACKOFF_UNIT_SECONDS": "0.2",
    "MAX_CONCURRENT_JOBS": "5",
    # A SIGTERM at the end of a test need not wait for slow model calls.
    "SHUTDOWN_GRACE_SECONDS": "5",
}


@pytest.fixture
async def make_system(tmp_path: Path) -> AsyncIterator[MakeSystem]:
    """Starts a system: ``await make_system(database_server=..., amqp=..., replicas=[(kind,
    name)], env_of={process: {SETTING: value}}, SETTING=value, ...)``; stops it, deletes
    its queues and drops its database afterwards. Request it after any private server
    fixture, so that it is torn down first (pytest tears fixtures down in the reverse
    order of their setup)."""
    made: list[System] = []

    async def make(
        *,
        database_server: str | None = None,
        amqp: str | None = None,
        replicas: Sequence[tuple[str, str]] = (),
        env_of: dict[str, dict[str, str]] | None = None,
        **settings: str | int | float,
    ) -> System:
        url = with_database(database_server or database_url(), f"cj_fault_{uuid.uuid4().hex[:12]}")
        await create_database(url)
        env = DEFAULTS | {key: str(value) for key, value in settings.items()}
        log_dir = tmp_path / f"logs-{len(made)}"
        log_dir.mkdir()
        system = System(
            url,
            amqp or amqp_url(),
            f"f{uuid.uuid4().hex[:10]}",
            log_dir,
            extra_env=env,
        )
        for kind, replica in replicas:
            system.add_replica(kind, replica)
        # Settings of one process only (a proxy in front of one replica's broker, say).
        for process_name, overrides in (env_of or {}).items():
            process = system.processes[process_name]
            process.env = {**process.env, **overrides}
        made.append(system)
        await system.start()
        return system

    yield make

    for system in reversed(made):
        system.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(delete_topology(system.amqp_url, Topology(system.prefix)), 15)
        with contextlib.suppress(Exception):
            await drop_database(system.database_url, timeout=5)


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of this test's own, stopped and removed whatever happens."""
    with PrivateRabbitMQ() as node:
        yield node


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own, stopped and removed whatever happens."""
    with PrivatePostgres() as cluster:
        yield cluster
