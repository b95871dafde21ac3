"""What the orchestrator says about what it recorded, in-process on the real Postgres and
RabbitMQ: every recorded event gets its log line and its counts exactly once, whatever
happened to the consumer that waited for its transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
import structlog

from canvas_events.broker import ACK, Outcome
from canvas_events.envelope import Envelope
from canvas_events.events import JobRequested
from canvas_events.postgres import JOB_RECORDING_LOCK_CLASS
from canvas_orchestrator import reporting
from canvas_orchestrator.service import Service
from tests.orchestrator.harness import eventually, metric, stream_types

# The log lines of each event a new job's request records.
_LINES = {
    "JobRequested": ["job requested"],
    "JobQueued": ["job queued"],
    "GenerationRequested": ["attempt dispatched"],
}


def _request() -> Envelope:
    canvas_id = f"canvas-{uuid4().hex[:8]}"
    return Envelope.wrap(
        JobRequested(query="a login flowchart", canvas_id=canvas_id, priority=5),
        correlation_id=f"req-{uuid4().hex[:8]}",
        job_id=uuid4(),
        user_id="alice",
        canvas_id=canvas_id,
    )


async def _consume(service: Service, envelope: Envelope) -> Outcome:
    """``envelope`` handled as the broker hands it over: in its own log context."""
    structlog.contextvars.bind_contextvars(
        job_id=str(envelope.job_id), correlation_id=envelope.correlation_id
    )
    return await service.handler.handle_envelope(envelope)


@asynccontextmanager
async def _recording_held(service: Service, job_id: UUID) -> AsyncIterator[None]:
    """While inside, a transaction recording ``job_id`` waits for its recording lock."""
    conn: asyncpg.Connection = await service.database.pool.acquire()
    try:
        await conn.execute(
            "SELECT pg_advisory_lock($1, hashtext($2::uuid::text))",
            JOB_RECORDING_LOCK_CLASS,
            job_id,
        )
        try:
            yield
        finally:
            await conn.execute(
                "SELECT pg_advisory_unlock($1, hashtext($2::uuid::text))",
                JOB_RECORDING_LOCK_CLASS,
                job_id,
            )
    finally:
        await service.database.pool.release(conn)


async def _waiting_for_recording_lock(service: Service) -> bool:
    waiting = await service.database.pool.fetchval(
        """
        SELECT count(*) FROM pg_locks
        WHERE locktype = 'advisory' AND NOT granted AND classid::bigint = $1
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
        """,
        JOB_RECORDING_LOCK_CLASS,
    )
    return bool(waiting)


def _of_job(logs: list[MutableMapping[str, Any]], job_id: UUID) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry.get("job_id") == str(job_id)]


async def test_a_transaction_committed_after_its_consumer_was_cancelled_is_logged_and_counted_once(
    start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The services' loggers cache their configuration on first use: in a process where
    # an earlier test already logged through reporting's, capture_logs would not see its
    # lines. A logger of its own, first used under capture_logs, does.
    monkeypatch.setattr(reporting, "log", structlog.get_logger("canvas_orchestrator.reporting"))
    service = await start()
    request = _request()
    assert request.job_id is not None
    job_id = request.job_id

    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        async with _recording_held(service, job_id):
            consumer = asyncio.create_task(_consume(service, request))
            await eventually(
                lambda: _waiting_for_recording_lock(service), what="the transaction waiting"
            )
            # The broker connection drops (or the service stops) while the transaction
            # runs: the consumer waiting for it is cancelled, the transaction goes on.
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            assert consumer.cancelled()
        types = await eventually(lambda: stream_types(service, job_id), what="the job recorded")
        # The message comes back (it was never acked): a duplicate, and nothing more.
        redelivered = await asyncio.create_task(_consume(service, request))

    assert redelivered is ACK
    assert types[:2] == ["JobRequested", "JobQueued"]
    expected = [line for kind in types for line in _LINES.get(kind, [kind])]
    said = [entry["event"] for entry in _of_job(logs, job_id)]
    assert sorted(said) == sorted([*expected, "duplicate message ignored"])
    assert {entry["correlation_id"] for entry in _of_job(logs, job_id)} == {request.correlation_id}
    messages = "canvas_orchestrator_messages_total"
    assert metric(service, messages, type="JobRequested", outcome="recorded") == 1
    assert metric(service, messages, type="JobRequested", outcome="duplicate") == 1
    assert metric(service, "canvas_jobs_total", status="queued") == 1
