"""One running system (real processes) per test module, and ``canvas-jobs`` run as a
subprocess against it, as a user would."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from canvas_events.topology import Topology
from tests.conftest import delete_topology
from tests.support.env import amqp_url, database_url
from tests.support.system import System


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    name = f"cj_cli_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url("postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    prefix = f"c{uuid.uuid4().hex[:10]}"
    log_dir: Path = tmp_path_factory.mktemp("cli-logs")
    running = System(database_url(name), amqp_url(), prefix, log_dir)
    try:
        await running.start()
        yield running
    finally:
        running.stop()
        await delete_topology(amqp_url(), Topology(prefix))
        admin = await asyncpg.connect(database_url("postgres"))
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
