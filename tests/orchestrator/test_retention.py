"""Pruning: consumed message ids and the gateway's ledger rows go once they can no longer
matter, and nothing that still matters goes with them."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta
from pathlib import Path
from uuid import UUID, uuid4

import asyncpg

from canvas_events.broker import ACK
from canvas_events.envelope import utcnow
from canvas_orchestrator.retention import Retention, prune
from tests.orchestrator.harness import JWT_SECRET, Bus, stream_types, wait_status
from tests.orchestrator.test_flow import dispatched_job, started, succeeded

RETENTION = Retention(processed_messages=timedelta(days=7), ledger=timedelta(days=1))
COMMAND = str(Path(sys.executable).parent / "canvas-orchestrator")


async def _ledger_row(
    pool: asyncpg.Pool,
    *,
    age: timedelta,
    confirmed: bool = True,
    recorded: bool = False,
    given_up: bool = False,
    job_id: UUID | None = None,
) -> UUID:
    job_id = job_id or uuid4()
    created = utcnow() - age
    await pool.execute(
        "INSERT INTO gateway_job_requests (job_id, user_id, canvas_id, priority, query, "
        "correlation_id, created_at, confirmed_at, recorded_at, given_up_at) "
        "VALUES ($1, 'alice', 'c', 5, 'q', 'corr', $2, $3, $4, $5)",
        job_id,
        created,
        created if confirmed else None,
        created if recorded else None,
        created if given_up else None,
    )
    return job_id


async def test_prune_drops_old_message_ids_and_finished_ledger_rows_and_nothing_else(start):
    service = await start()
    # The service's own pruner prunes once as it starts: stopped (its prune in hand
    # finished) before the rows are made, so that only this test's prune sees them.
    # (It once pruned the old message ids between two of the inserts below.)
    await service.pruner.stop()
    pool = service.database.pool
    now = utcnow()
    await pool.execute(
        "INSERT INTO processed_messages (consumer, message_id, processed_at) "
        "SELECT 'job-orchestrator', gen_random_uuid(), $1::timestamptz - make_interval(days => d) "
        "FROM generate_series(1, 20) AS d",
        now,
    )
    keep = {
        "recent recorded": await _ledger_row(pool, age=timedelta(hours=1), recorded=True),
        # Accepted and never recorded: the sweep still owes it a resend, however old.
        "old unrecorded": await _ledger_row(pool, age=timedelta(days=30)),
    }
    drop = {
        "old recorded": await _ledger_row(pool, age=timedelta(days=2), recorded=True),
        "old given up": await _ledger_row(pool, age=timedelta(days=2), given_up=True),
        "old never confirmed": await _ledger_row(pool, age=timedelta(days=2), confirmed=False),
    }

    pruned = await prune(pool, RETENTION, now=now)

    ages = await pool.fetch("SELECT processed_at FROM processed_messages")
    assert pruned.processed_messages == 13  # 8 .. 20 days old
    assert all(now - row["processed_at"] < timedelta(days=7, minutes=1) for row in ages)
    left = {row["job_id"] for row in await pool.fetch("SELECT job_id FROM gateway_job_requests")}
    assert left == set(keep.values())
    assert pruned.ledger == len(drop)
    assert (await prune(pool, RETENTION, now=now)).processed_messages == 0


async def test_a_message_redelivered_after_its_id_was_pruned_changes_nothing(start, bus: Bus):
    service = await start()
    _, job_id, requested = await dispatched_job(bus)
    await bus.reply(requested, started(requested))
    result = requested.follow(succeeded(requested))
    assert await service.handler.handle_envelope(result) is ACK
    await wait_status(service, job_id, "completed")
    history = await stream_types(service, job_id)

    await service.database.pool.execute("DELETE FROM processed_messages")  # all pruned
    assert await service.handler.handle_envelope(result) is ACK

    assert await stream_types(service, job_id) == history


async def test_prune_command_prints_what_it_pruned(database_url):
    env = {**os.environ, "DATABASE_URL": database_url, "JWT_SECRET": JWT_SECRET}
    process = await asyncio.create_subprocess_exec(
        COMMAND,
        "prune",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    # The log lines (JSON, on stdout) come first.
    assert stdout.decode().strip().splitlines()[-1] == (
        "canvas-orchestrator: pruned 0 processed message ids, 0 ledger rows, 0 cancel requests"
    )
