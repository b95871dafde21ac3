"""What the orchestrator says about what it recorded, in-process on the real Postgres and
RabbitMQ: every recorded event gets its log line and its counts exactly once, whatever
happened to the consumer that waited for its transaction."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
import structlog

from canvas_events.broker import ACK, Outcome
from canvas_events.envelope import Envelope
from canvas_events.events import JobCancelRequested, JobRequested
from canvas_events.postgres import JOB_RECORDING_LOCK_CLASS
from canvas_orchestrator import batching, handlers, reporting
from canvas_orchestrator.batching import GroupCommit
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


async def test_lines_written_inside_the_transaction_name_their_job(
    start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line the transaction writes itself is not in any message's log context: it
    names the job (and its correlation id) itself."""
    monkeypatch.setattr(handlers, "log", structlog.get_logger("canvas_orchestrator.handlers"))
    service = await start()
    request = _request()
    job_id = request.job_id
    assert job_id is not None
    # Someone else's cancel of the job, before the job's own request is recorded.
    cancel = Envelope.wrap(
        JobCancelRequested(reason="not mine"),
        correlation_id=f"req-{uuid4().hex[:8]}",
        job_id=job_id,
        user_id="mallory",
        canvas_id=request.canvas_id,
    )
    with structlog.testing.capture_logs() as logs:
        assert await _consume(service, cancel) is ACK
        assert await _consume(service, request) is ACK
        await eventually(lambda: stream_types(service, job_id), what="the job recorded")
    [line] = [
        entry
        for entry in logs
        if entry["event"] == "a cancel requested by someone who does not own the job ignored"
    ]
    assert line["job_id"] == str(job_id)
    assert line["correlation_id"] == cancel.correlation_id


class _Conflict(Exception):
    pass


async def test_a_batch_decided_again_names_its_job_or_its_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batching, "log", structlog.get_logger("canvas_orchestrator.batching"))
    tries: list[int] = []

    async def process(items: Sequence[tuple[str, str]]) -> list[str]:
        tries.append(len(items))
        if len(tries) % 2:  # every batch loses its first race
            raise _Conflict
        return [item[0] for item in items]

    commit: GroupCommit[tuple[str, str], str] = GroupCommit(
        process,
        key=lambda item: item[0],
        conflicts=(_Conflict,),
        is_outage=lambda exc: False,
        max_batch=10,
        name="test",
        describe=lambda batch: {"jobs": sorted({item[0] for item in batch})},
    )
    with structlog.testing.capture_logs() as logs:
        assert await commit.submit(("job-a", "corr-1")) == "job-a"
    assert [entry.get("jobs") for entry in logs] == [["job-a"]]
    assert logs[0]["event"] == "a stream changed meanwhile; deciding again"


def test_a_batchs_log_fields_are_its_jobs() -> None:
    one, other = uuid4(), uuid4()

    def message(job_id: UUID, correlation_id: str) -> handlers._Message:
        envelope = _request().model_copy(
            update={"job_id": job_id, "correlation_id": correlation_id}
        )
        event = JobRequested(query="q", canvas_id="c", priority=5)
        return handlers._Message(job_id, envelope, event, None, contextvars.Context())

    assert handlers._described([message(one, "c1"), message(one, "c2")]) == {
        "job_id": str(one),
        "correlation_id": "c1",
    }
    assert handlers._described([message(one, "c1"), message(other, "c3")]) == {
        "job_ids": [str(one), str(other)],
        "messages": 2,
    }
