"""rebuild-projections while the system runs: new jobs keep completing and reads keep
answering during a rebuild of a thousand jobs, and the rebuilt read models hold every
job, those recorded during the rebuild too, under the same table and index names.

(It used to truncate the read models and replay in one transaction: every read and every
append waited for the whole replay.)"""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import asyncpg

from canvas_events.envelope import Envelope
from canvas_events.events import (
    GenerationRequested,
    GenerationStarted,
    GenerationSucceeded,
    JobCompleted,
    JobQueued,
    JobRequested,
)
from canvas_orchestrator import domain
from canvas_orchestrator.projections import rebuild
from canvas_store.events import Append, append_streams
from tests.orchestrator.harness import Bus, eventually, job_row
from tests.orchestrator.test_flow import dispatched, started, succeeded

JOBS = 1_000
OBJECT = {"type": "rectangle", "x": 1, "y": 2, "width": 3, "height": 4}


def _history(job_id: UUID, index: int) -> list[Envelope]:
    """A completed job's stream, as the orchestrator records it."""
    canvas_id = f"canvas-{index}"
    first = Envelope.wrap(
        JobRequested(query=f"job {index}", canvas_id=canvas_id, priority=5),
        correlation_id=f"seed-{index}",
        job_id=job_id,
        user_id=f"user-{index % 50}",
        canvas_id=canvas_id,
    )
    attempt_id = uuid4()
    events = [
        JobQueued(priority=5, retry_count=0),
        GenerationRequested(
            attempt_id=attempt_id,
            attempt=1,
            query=f"job {index}",
            priority=5,
            lease_expires_at=first.occurred_at,
        ),
        GenerationStarted(attempt_id=attempt_id, model="m", generator_id="g"),
        GenerationSucceeded(
            attempt_id=attempt_id, objects=[OBJECT], dropped_objects=0, model="m", latency_ms=1
        ),
        JobCompleted(
            object_count=1,
            object_ids=[domain.object_id(job_id, 0)],
            dropped_objects=0,
            model="m",
            latency_ms=1,
        ),
    ]
    return [first, *(first.follow(event) for event in events)]


async def _seed(pool: asyncpg.Pool, count: int) -> list[UUID]:
    """``count`` completed jobs in the event store (the read models left to rebuild)."""
    job_ids = [uuid4() for _ in range(count)]
    for start in range(0, count, 500):
        appends = [
            Append(job_id, 0, _history(job_id, start + n))
            for n, job_id in enumerate(job_ids[start : start + 500])
        ]
        async with pool.acquire() as conn, conn.transaction():
            await append_streams(conn, appends)
    return job_ids


async def _index_names(pool: asyncpg.Pool) -> set[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public' "
        "AND tablename IN ('jobs', 'canvases', 'canvas_objects')"
    )
    return {(row["tablename"], row["indexname"]) for row in rows}


async def test_jobs_complete_and_reads_answer_while_the_read_models_are_rebuilt(start, bus: Bus):
    service = await start()
    pool = service.database.pool
    seeded = await _seed(pool, JOBS)
    await rebuild(pool)  # the live read models, from the store
    indexes = await _index_names(pool)
    assert await pool.fetchval("SELECT count(*) FROM jobs") == JOBS

    rebuilding = asyncio.create_task(rebuild(pool))
    reads = 0
    finished_during: list[UUID] = []

    async def new_jobs() -> None:
        while not rebuilding.done():
            request = await bus.request()
            assert request.job_id is not None
            requested = await dispatched(bus, request.job_id)
            await bus.reply(requested, started(requested))
            await bus.reply(requested, succeeded(requested))

            async def completed(job_id: UUID = request.job_id) -> bool:
                row = await job_row(service, job_id)
                return row is not None and row["status"] == "completed"

            await eventually(completed, what="a job recorded during the rebuild")
            if not rebuilding.done():
                finished_during.append(request.job_id)

    flowing = asyncio.create_task(new_jobs())
    while not rebuilding.done():
        row = await pool.fetchrow("SELECT status FROM jobs WHERE id = $1", seeded[reads % JOBS])
        assert row is not None
        assert row["status"] == "completed"
        if not rebuilding.done():
            reads += 1
        await asyncio.sleep(0.01)
    replayed = await rebuilding
    await flowing

    print(f"rebuild: {replayed} events, {reads} reads and {len(finished_during)} jobs during it")
    assert reads > 10  # reads answered while the rebuild ran
    assert finished_during  # and jobs went from request to completion meanwhile
    # The rebuilt tables hold every job, those recorded during the rebuild too...
    for job_id in finished_during:
        row = await job_row(service, job_id)
        assert row is not None
        assert row["status"] == "completed"
    total = await pool.fetchval("SELECT count(*) FROM jobs")
    assert total >= JOBS + len(finished_during)
    objects = await pool.fetchval("SELECT count(*) FROM canvas_objects")
    assert objects >= JOBS
    # ...under the names the migrations gave them.
    assert await _index_names(pool) == indexes
    schemas = await pool.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'canvas_%'")
    assert schemas == []
