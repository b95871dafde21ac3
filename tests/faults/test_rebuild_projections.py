"""``canvas-orchestrator rebuild-projections``, the real command as a subprocess, on a
database that a running system filled with completed, failed (at once and after a
retry) and cancelled jobs: with the read models emptied, it rebuilds the jobs,
canvases and canvas_objects rows exactly as they were."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import asyncpg

from tests.faults.conftest import MakeSystem
from tests.faults.harness import Client, count_status, query

COMMAND = str(Path(sys.executable).parent / "canvas-orchestrator")
READ_MODELS = ("jobs", "canvases", "canvas_objects")


async def _snapshot(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    return {
        table: [dict(row) for row in await conn.fetch(f"SELECT * FROM {table} ORDER BY id")]
        for table in READ_MODELS
    }


async def test_rebuild_projections_command_restores_every_read_model_row(
    make_system: MakeSystem,
) -> None:
    system = await make_system(MAX_JOB_RETRIES=1, RETRY_BACKOFF_UNIT_SECONDS=0.1)
    async with Client(system) as client:
        completed = await client.submit_many([query(i) for i in range(3)])
        failed = await client.submit_many(
            [
                query(3, extra="status=401"),  # permanent: fails at once
                query(4, extra="status=500"),  # transient: fails after its one retry
            ]
        )
        slow = await client.submit(query(5, delay_ms=3000))
        await client.wait_until(
            lambda jobs: jobs.get(slow.job_id, {}).get("status") == "processing",
            timeout=20,
            what="the slow job to be processing",
        )
        cancel = await client.cancel(slow.job_id)
        assert cancel.status_code == 202, cancel.text
        submitted = [*completed, *failed, slow]
        statuses = await client.wait_final(submitted, timeout=30)
    assert [statuses[job.job_id]["status"] for job in submitted] == [
        *["completed"] * 3,
        "failed",
        "failed",
        "cancelled",
    ]
    assert statuses[failed[1].job_id]["retry_count"] == 1
    assert count_status(statuses) == 3
    # Nothing may write while the tables are compared.
    system.stop()

    conn = await asyncpg.connect(system.database_url)
    try:
        before = await _snapshot(conn)
        assert len(before["canvas_objects"]) >= 3 and len(before["canvases"]) == 6
        await conn.execute(f"TRUNCATE {', '.join(READ_MODELS)}")
        events = await conn.fetchval("SELECT count(*) FROM events")

        process = await asyncio.create_subprocess_exec(
            COMMAND,
            "rebuild-projections",
            env={**os.environ, **system.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, stderr.decode()
        assert f"rebuilt from {events} events" in stdout.decode()
        after = await _snapshot(conn)
    finally:
        await conn.close()

    for table in READ_MODELS:
        assert after[table] == before[table], table
