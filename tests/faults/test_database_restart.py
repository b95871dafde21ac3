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

from tests.faults.conftest import MakeSystem
from tests.faults.harness import answers_200, eventually, restart_mid_run
from tests.support.servers import PrivatePostgres


async def test_database_restarted_mid_run_services_recover_and_nothing_is_lost(
    private_postgres: PrivatePostgres, make_system: MakeSystem
) -> None:
    system = await make_system(database_server=private_postgres.url(), MAX_CONCURRENT_JOBS=5)
    users_of_the_database = [
        system.processes[name] for name in ("orchestrator", "gateway", "notifier")
    ]
    orchestrator_ready = f"{system.url('orchestrator')}/ready"

    async def not_ready() -> bool:
        return not await answers_200(orchestrator_ready)

    async def restart() -> None:
        await asyncio.to_thread(private_postgres.stop)
        # Down long enough for every service to notice: /ready says so meanwhile.
        await eventually(not_ready, timeout=10, what="the orchestrator to report the database away")
        await asyncio.sleep(1)
        await asyncio.to_thread(private_postgres.start)

    # New work then goes through too, from the gateway's ledger to the canvas.
    await restart_mid_run(system, "database-restart", restart, users_of_the_database)
