"""Restart PostgreSQL in the middle of a run: the orchestrator, the gateway and the
notifier recover on their own, nothing is lost.

The database restarted here is a private cluster this test creates from the installed
server binaries (tests/support/servers.py), never the one named by DATABASE_URL:
restarting a shared server would break every other test using it and the developer's
own ``make dev``, and a server named by DATABASE_URL may be remote. It is stopped with
``pg_ctl stop -m fast`` (every client is disconnected, as in a failover or an upgrade)
and started again on the same data directory; the fixture removes it whatever happens.

Why nothing is lost: a message whose transaction the database broke off is not acked
but requeued (the broker keeps it), and handled again once the database is back; what
committed before the stop is in the event store, and the relay carries on from its
checkpoint.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.conftest import MakeSystem
from tests.faults.harness import (
    Client,
    Watcher,
    answers_200,
    check_outcome,
    count_status,
    eventually,
    figures,
    log_problems,
    query,
    wait_ready,
)
from tests.support.servers import PrivatePostgres

pytestmark = pytest.mark.e2e

JOBS = 20
AFTER = 3


async def test_database_restarted_mid_run_services_recover_and_nothing_is_lost(
    private_postgres: PrivatePostgres, make_system: MakeSystem
) -> None:
    system = await make_system(database_server=private_postgres.url(), MAX_CONCURRENT_JOBS=5)
    users_of_the_database = [
        system.processes[name] for name in ("orchestrator", "gateway", "notifier")
    ]
    async with Client(system) as client, Watcher(system) as watcher:
        submitted = await client.submit([query(i, delay_ms=1000) for i in range(JOBS)])
        await client.wait_until(
            lambda jobs: count_status(jobs) >= 3, timeout=30, what="the first jobs to complete"
        )
        down = time.monotonic()
        await asyncio.to_thread(private_postgres.stop)
        # Down long enough for every service to notice: /ready says so meanwhile.
        orchestrator_ready = f"{system.url('orchestrator')}/ready"

        async def not_ready() -> bool:
            return not await answers_200(orchestrator_ready)

        await eventually(not_ready, timeout=10, what="the orchestrator to report the database away")
        await asyncio.sleep(1)
        await asyncio.to_thread(private_postgres.start)
        restarted = time.monotonic()
        await wait_ready(users_of_the_database, timeout=60)
        recovered = time.monotonic()

        # New work goes through too, from the gateway's ledger to the canvas.
        submitted += await client.submit([query(JOBS + i) for i in range(AFTER)])
        statuses = await client.wait_final(submitted, timeout=45)
        outcome = await check_outcome(client, system.database_url, submitted, statuses)
        # A WebSocket client that reconnects with after= saw every completion too.
        await watcher.wait_completed({job.job_id for job in submitted}, timeout=20)

    figures(
        "database-restart",
        outcome,
        faults=1,
        ws_reconnects=watcher.connects - 1,
        database_down_s=round(restarted - down, 1),
        ready_again_s=round(recovered - down, 1),
    )
    assert outcome.completed == JOBS + AFTER, outcome.problems
    assert outcome.lost == 0 and outcome.duplicated_objects == 0
    assert outcome.problems == []
    assert watcher.problems() == []
    assert log_problems(system) == []
