"""The orchestrator's consumer, relay and timers together, in-process, on the real
Postgres and RabbitMQ: messages in as the gateway and generators send them, events out
as the generators and notifiers receive them."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4, uuid5

import asyncpg

from canvas_events.broker import ACK, DeadLetter
from canvas_events.envelope import Envelope
from canvas_events.events import (
    GenerationFailed,
    GenerationProgressed,
    GenerationStarted,
    GenerationSucceeded,
    JobCancelRequested,
    JobQueued,
    JobRequested,
)
from canvas_events.topology import GATEWAY
from canvas_orchestrator import domain
from canvas_orchestrator.projections import rebuild
from canvas_orchestrator.service import Service
from tests.orchestrator.harness import (
    Bus,
    eventually,
    job_row,
    metric,
    stream_types,
    wait_status,
)

OBJECTS = [
    {"type": "rectangle", "x": 10, "y": 20, "width": 100, "height": 50},
    {"type": "text", "x": 15, "y": 25, "text": "Login"},
    {"type": "arrow", "points": [[0, 0], [10, 10]]},
]
# A job's history up to the dispatch of its second attempt, after its first failed.
RETRIED = [
    "JobRequested",
    "JobQueued",
    "GenerationRequested",
    "GenerationStarted",
    "GenerationFailed",
    "JobRetryScheduled",
    "JobQueued",
    "GenerationRequested",
]


async def dispatched(bus: Bus, job_id: UUID, attempt: int = 1) -> Envelope:
    """The GenerationRequested envelope of the job's ``attempt``, as a generator gets it."""
    seen = await bus.wait_for(job_id, "GenerationRequested", attempt)
    return seen[attempt - 1].envelope


def started(requested: Envelope) -> GenerationStarted:
    return GenerationStarted(
        attempt_id=requested.data["attempt_id"], model="test-model", generator_id="gen-1"
    )


def succeeded(requested: Envelope) -> GenerationSucceeded:
    return GenerationSucceeded(
        attempt_id=requested.data["attempt_id"],
        objects=OBJECTS,
        dropped_objects=1,
        model="test-model",
        usage={"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        latency_ms=321,
    )


def failed(requested: Envelope, *, retryable: bool, error: str = "boom") -> GenerationFailed:
    return GenerationFailed(
        attempt_id=requested.data["attempt_id"],
        error=error,
        kind="timeout" if retryable else "auth",
        retryable=retryable,
    )


async def dispatched_job(bus: Bus, **request: Any) -> tuple[Envelope, UUID, Envelope]:
    """A job requested as the gateway does (``request``: :meth:`Bus.request`'s fields):
    its JobRequested, its id, and the GenerationRequested of its first attempt."""
    envelope = await bus.request(**request)
    assert envelope.job_id is not None
    return envelope, envelope.job_id, await dispatched(bus, envelope.job_id)


async def counted_once(service: Service, message_type: str, outcome: str, *, what: str) -> None:
    """Wait until the orchestrator has counted one ``message_type`` message handled
    with ``outcome`` (``duplicate``, ``ignored``, ...)."""
    await eventually(
        lambda: (
            metric(
                service, "canvas_orchestrator_messages_total", type=message_type, outcome=outcome
            )
            == 1
        ),
        what=what,
    )


async def object_count(service: Service, job_id: UUID) -> int:
    """The job's rows in canvas_objects."""
    count = await service.database.pool.fetchval(
        "SELECT count(*) FROM canvas_objects WHERE job_id = $1", job_id
    )
    return int(count)


async def canvas_owner(service: Service, canvas_id: str | None) -> str | None:
    """The user the canvases read model gives ``canvas_id`` to."""
    owner: str | None = await service.database.pool.fetchval(
        "SELECT user_id FROM canvases WHERE id = $1", canvas_id
    )
    return owner


# -- requests -------------------------------------------------------------------------


async def test_job_request_is_queued_and_dispatched_with_positions_and_priority(start, bus):
    service = await start()

    request, job_id, _ = await dispatched_job(bus, priority=8)

    # JobRequested is recorded (position 1) but not republished: no queue consumes it.
    published = bus.of(job_id)
    assert [seen.envelope.type for seen in published] == ["JobQueued", "GenerationRequested"]
    assert [seen.routing_key for seen in published] == [
        "job.JobQueued",
        "job.GenerationRequested",
    ]
    positions = [seen.envelope.position for seen in published]
    assert all(position is not None for position in positions)
    assert positions == sorted(positions)
    generation = published[1]
    assert generation.priority == 8
    assert generation.envelope.data["attempt"] == 1
    for seen in published:
        assert seen.envelope.correlation_id == request.correlation_id
        assert seen.envelope.user_id == "alice"
        assert seen.envelope.canvas_id == request.canvas_id
        assert seen.envelope.causation_id == request.event_id
    recorded_request = await service.database.pool.fetchrow(
        "SELECT type, occurred_at, position FROM events WHERE stream_id = $1 AND version = 1",
        job_id,
    )
    assert recorded_request["type"] == "JobRequested"
    assert recorded_request["occurred_at"] == request.occurred_at
    assert recorded_request["position"] < positions[0]

    row = await wait_status(service, job_id, "queued")
    assert row["attempt"] == 1
    assert row["version"] == 3
    assert row["last_position"] == positions[-1]
    assert row["priority"] == 8
    assert row["lease_expires_at"] is not None
    assert await canvas_owner(service, request.canvas_id) == "alice"
    assert metric(service, "canvas_jobs_total", status="queued") == 1


async def test_the_same_message_delivered_twice_is_recorded_once(start, bus):
    service = await start()
    request, job_id, _ = await dispatched_job(bus)

    await bus.publish(request, GATEWAY)

    await counted_once(service, "JobRequested", "duplicate", what="the duplicate to be handled")
    assert await stream_types(service, job_id) == [
        "JobRequested",
        "JobQueued",
        "GenerationRequested",
    ]


async def test_a_repeated_request_for_the_same_job_records_nothing_more(start, bus):
    service = await start()
    first, job_id, _ = await dispatched_job(bus)

    await bus.request(job_id=job_id, canvas_id=first.canvas_id)

    await counted_once(
        service, "JobRequested", "ignored", what="the repeated request to be ignored"
    )
    assert len(await stream_types(service, job_id)) == 3


async def test_a_job_on_another_users_canvas_fails_with_canvas_not_found(start, bus):
    service = await start()
    alices = await bus.request(user_id="alice")
    assert alices.job_id is not None
    await wait_status(service, alices.job_id, "queued")

    bobs = await bus.request(user_id="bob", canvas_id=alices.canvas_id)
    assert bobs.job_id is not None

    row = await wait_status(service, bobs.job_id, "failed")
    assert row["error_message"] == "canvas not found"
    assert await stream_types(service, bobs.job_id) == ["JobRequested", "JobFailed"]
    assert await canvas_owner(service, alices.canvas_id) == "alice"


async def test_an_event_only_the_orchestrator_records_is_dead_lettered(start):
    service = await start()
    envelope = Envelope.wrap(
        JobQueued(priority=1, retry_count=0),
        correlation_id="c-1",
        job_id=UUID(int=5),
        user_id="alice",
    )

    outcome = await service.handler.handle_envelope(envelope)

    assert isinstance(outcome, DeadLetter)


# -- attempts -------------------------------------------------------------------------


async def test_generation_succeeded_completes_the_job_and_puts_its_objects_on_the_canvas(
    start, bus
):
    service = await start()
    request, job_id, requested = await dispatched_job(bus)

    await bus.reply(requested, started(requested))
    await wait_status(service, job_id, "processing")
    for index, obj in enumerate(OBJECTS):
        await bus.reply(
            requested,
            GenerationProgressed(attempt_id=requested.data["attempt_id"], index=index, object=obj),
        )
    await bus.wait_for(job_id, "GenerationProgressed", len(OBJECTS))
    await bus.reply(requested, succeeded(requested))

    completed = (await bus.wait_for(job_id, "JobCompleted"))[0].envelope
    row = await wait_status(service, job_id, "completed")
    object_ids = [str(uuid5(job_id, str(index))) for index in range(len(OBJECTS))]
    assert completed.data["object_ids"] == object_ids
    assert row["started_at"] is not None
    assert row["completed_at"] == completed.occurred_at
    assert row["lease_expires_at"] is None
    assert row["result"] == {
        "object_count": 3,
        "object_ids": object_ids,
        "dropped_objects": 1,
        "model": "test-model",
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        "latency_ms": 321,
    }
    objects = await service.database.pool.fetch(
        "SELECT * FROM canvas_objects WHERE job_id = $1 ORDER BY index", job_id
    )
    assert [obj["id"] for obj in objects] == object_ids
    assert [obj["object"] for obj in objects] == OBJECTS
    assert {obj["canvas_id"] for obj in objects} == {request.canvas_id}
    assert {obj["user_id"] for obj in objects} == {"alice"}
    assert await stream_types(service, job_id) == [
        "JobRequested",
        "JobQueued",
        "GenerationRequested",
        "GenerationStarted",
        "GenerationProgressed",
        "GenerationProgressed",
        "GenerationProgressed",
        "GenerationSucceeded",
        "JobCompleted",
    ]
    assert metric(service, "canvas_jobs_total", status="completed") == 1
    assert metric(service, "canvas_attempt_duration_seconds_count", outcome="succeeded") == 1


async def test_a_burst_of_one_jobs_messages_is_recorded_in_order_in_few_transactions(start, bus):
    service = await start()
    _, job_id, requested = await dispatched_job(bus)
    await service.handler.handle_envelope(requested.follow(started(requested)))
    before = metric(service, "canvas_orchestrator_batch_messages_count")
    appends = metric(service, "canvas_orchestrator_append_commit_seconds_count")
    attempt_id = requested.data["attempt_id"]
    burst = [
        requested.follow(
            GenerationProgressed(attempt_id=attempt_id, index=index, object=OBJECTS[0])
        )
        for index in range(30)
    ]
    # A redelivery inside the burst: recorded once.
    burst.insert(10, burst[4])

    outcomes = await asyncio.gather(*(service.handler.handle_envelope(item) for item in burst))

    assert all(outcome is ACK for outcome in outcomes)
    stream = await service.database.pool.fetch(
        "SELECT data FROM events WHERE stream_id = $1 AND type = 'GenerationProgressed' "
        "ORDER BY version",
        job_id,
    )
    assert [row["data"]["index"] for row in stream] == list(range(30))
    transactions = metric(service, "canvas_orchestrator_batch_messages_count") - before
    assert 1 <= transactions < 10, transactions
    assert metric(service, "canvas_orchestrator_batch_messages_sum") >= 31
    # Each transaction that appended says how long its commit took after the append.
    held = metric(service, "canvas_orchestrator_append_commit_seconds_count") - appends
    assert 1 <= held <= transactions
    assert (
        metric(
            service,
            "canvas_orchestrator_messages_total",
            type="GenerationProgressed",
            outcome="duplicate",
        )
        == 1
    )


async def test_a_message_that_breaks_its_batch_is_retried_alone(start, bus, monkeypatch):
    service = await start()
    dispatches = []
    for _ in range(2):
        _, job_id, requested = await dispatched_job(bus)
        await service.handler.handle_envelope(requested.follow(started(requested)))
        dispatches.append((job_id, requested))
    real_progress = domain.progress

    def progress(state: domain.JobState, event: GenerationProgressed) -> list[Any]:
        if state.job_id == dispatches[0][0] and event.index == 3:
            raise RuntimeError("a bug that only object 3 of the first job meets")
        return real_progress(state, event)

    monkeypatch.setattr(domain, "progress", progress)
    # The two jobs' objects interleaved, as two generators' bursts arrive.
    burst = [
        requested.follow(
            GenerationProgressed(
                attempt_id=requested.data["attempt_id"], index=index, object=OBJECTS[0]
            )
        )
        for index in range(6)
        for _, requested in dispatches
    ]

    outcomes = await asyncio.gather(
        *(service.handler.handle_envelope(item) for item in burst), return_exceptions=True
    )

    failed = [index for index, outcome in enumerate(outcomes) if outcome is not ACK]
    assert failed == [6], outcomes  # object 3 of the first job, and nothing else
    assert isinstance(outcomes[6], RuntimeError)
    for job_id, expected in zip(
        (job_id for job_id, _ in dispatches), ([0, 1, 2, 4, 5], [0, 1, 2, 3, 4, 5]), strict=True
    ):
        stream = await service.database.pool.fetch(
            "SELECT data FROM events WHERE stream_id = $1 AND type = 'GenerationProgressed' "
            "ORDER BY version",
            job_id,
        )
        assert [row["data"]["index"] for row in stream] == expected


async def test_two_users_first_jobs_on_one_new_canvas_in_one_batch_give_it_to_one(start):
    service = await start()
    canvas_id = f"canvas-{uuid4().hex[:8]}"
    # Bob's job id sorts first (the order job rows are locked in); Alice's request
    # comes first.
    bobs_id, alices_id = sorted([uuid4(), uuid4()])
    requests = [
        Envelope.wrap(
            JobRequested(query="a login flowchart", canvas_id=canvas_id, priority=5),
            correlation_id=f"req-{user}",
            job_id=job_id,
            user_id=user,
            canvas_id=canvas_id,
        )
        for user, job_id in (("alice", alices_id), ("bob", bobs_id))
    ]

    outcomes = await asyncio.gather(*(service.handler.handle_envelope(r) for r in requests))

    assert all(outcome is ACK for outcome in outcomes)
    statuses = {}
    for request in requests:
        assert request.job_id is not None
        row = await job_row(service, request.job_id)
        assert row is not None
        statuses[request.user_id] = (row["status"], row["error_message"])
    assert statuses == {"alice": ("queued", None), "bob": ("failed", "canvas not found")}
    assert await canvas_owner(service, canvas_id) == "alice"
    # The store tells the same story: replayed in position order, Alice's job comes first.
    await rebuild(service.database.pool)
    assert await canvas_owner(service, canvas_id) == "alice"


async def test_permanent_generation_failure_fails_the_job_with_the_generators_error(start, bus):
    service = await start()
    _, job_id, requested = await dispatched_job(bus)

    await bus.reply(requested, started(requested))
    await bus.reply(requested, failed(requested, retryable=False, error="invalid API key"))

    row = await wait_status(service, job_id, "failed")
    assert row["error_message"] == "invalid API key"
    assert row["retry_count"] == 0
    await bus.wait_for(job_id, "JobFailed")
    assert (await stream_types(service, job_id))[-2:] == ["GenerationFailed", "JobFailed"]
    assert await object_count(service, job_id) == 0


async def test_retryable_failure_is_retried_after_the_backoff_and_then_completes(start, bus):
    service = await start(retry_backoff_unit_seconds=0.05)
    _, job_id, first = await dispatched_job(bus)
    await bus.reply(first, started(first))
    await bus.reply(first, failed(first, retryable=True, error="model timed out"))

    second = await dispatched(bus, job_id, attempt=2)
    assert second.data["attempt"] == 2
    assert second.data["attempt_id"] != first.data["attempt_id"]
    retry = (await bus.wait_for(job_id, "JobRetryScheduled"))[0].envelope
    assert retry.data["retry_count"] == 1
    assert retry.data["error"] == "model timed out"

    # The first attempt's generator answers late: too late to count.
    await bus.reply(first, succeeded(first))
    await bus.reply(second, started(second))
    await bus.reply(second, succeeded(second))

    row = await wait_status(service, job_id, "completed")
    assert row["retry_count"] == 1
    assert row["attempt"] == 2
    assert await stream_types(service, job_id) == [
        *RETRIED,
        "GenerationStarted",
        "GenerationSucceeded",
        "JobCompleted",
    ]
    assert metric(service, "canvas_orchestrator_timers_total", kind="retry_due") == 1


async def test_an_attempt_no_generator_finishes_is_retried_and_never_left_processing(start, bus):
    service = await start(
        # Long enough for this test's own "started" to arrive in time on a loaded
        # machine (0.3 s was not, once: the first attempt then failed unstarted).
        generation_lease_seconds=1.0,
        generation_start_timeout_seconds=1.0,
        retry_backoff_unit_seconds=0.05,
        max_job_retries=1,
    )
    _, job_id, first = await dispatched_job(bus)
    await bus.reply(first, started(first))  # then the generator dies; no other takes over

    row = await wait_status(service, job_id, "failed")
    assert row["retry_count"] == 1
    # The first attempt ran out of its running lease, the second of its start deadline.
    assert row["error_message"] == (
        "attempt not started in time: no generator took it from the queue"
    )
    assert await stream_types(service, job_id) == [*RETRIED, "GenerationFailed", "JobFailed"]
    assert metric(service, "canvas_orchestrator_timers_total", kind="lease_expired") == 2


async def test_cancel_while_processing_discards_objects(start, bus):
    service = await start()
    request, job_id, requested = await dispatched_job(bus)
    await bus.reply(requested, started(requested))
    await wait_status(service, job_id, "processing")

    await bus.publish(request.follow(JobCancelRequested(reason="changed my mind")), GATEWAY)
    await bus.wait_for(job_id, "JobCancelled")
    await bus.reply(requested, succeeded(requested))

    await counted_once(
        service, "GenerationSucceeded", "ignored", what="the late result to be ignored"
    )
    row = await wait_status(service, job_id, "cancelled")
    assert row["completed_at"] is not None
    assert (await stream_types(service, job_id))[-2:] == ["JobCancelRequested", "JobCancelled"]
    assert await object_count(service, job_id) == 0


async def test_cancel_from_someone_else_changes_nothing(start, bus):
    service = await start()
    request, job_id, _ = await dispatched_job(bus, user_id="alice")

    await bus.publish(request.follow(JobCancelRequested(), user_id="mallory"), GATEWAY)

    await counted_once(
        service, "JobCancelRequested", "ignored", what="the foreign cancel to be ignored"
    )
    row = await job_row(service, job_id)
    assert row is not None
    assert row["status"] == "queued"


# -- several orchestrators ----------------------------------------------------------


async def test_two_orchestrators_share_the_work_and_the_survivor_takes_over_the_relay(start, bus):
    first = await start()
    await eventually(lambda: _true(first.relay.active), what="the first relay to be active")
    second = await start()
    requests = [await bus.request() for _ in range(6)]
    for request in requests:
        assert request.job_id is not None
        await bus.wait_for(request.job_id, "GenerationRequested")
    assert not second.relay.active

    await first.stop()

    await eventually(lambda: _true(second.relay.active), what="the survivor to take over")
    late, late_id, requested = await dispatched_job(bus)
    await bus.reply(requested, started(requested))
    await bus.reply(requested, succeeded(requested))
    await wait_status(second, late_id, "completed")
    for request in [*requests, late]:
        assert request.job_id is not None
        assert len(bus.of(request.job_id, "JobQueued")) >= 1
        assert len(await stream_types(second, request.job_id)) >= 3


async def _true(value: bool) -> bool:
    return value


# -- read models ----------------------------------------------------------------------


async def _read_models(pool: asyncpg.Pool) -> dict[str, list[dict[str, Any]]]:
    return {
        "jobs": [dict(row) for row in await pool.fetch("SELECT * FROM jobs ORDER BY id")],
        "canvases": [dict(row) for row in await pool.fetch("SELECT * FROM canvases ORDER BY id")],
        "canvas_objects": [
            dict(row) for row in await pool.fetch("SELECT * FROM canvas_objects ORDER BY id")
        ],
    }


async def test_rebuild_projections_reproduces_the_read_models_exactly(start, bus):
    service = await start(retry_backoff_unit_seconds=3600)
    jobs = [await bus.request(user_id=user) for user in ("alice", "alice", "bob", "bob", "carol")]
    ids = [job.job_id for job in jobs]
    assert all(job_id is not None for job_id in ids)
    requested = [await dispatched(bus, job_id) for job_id in ids]
    completed, failed_job, _cancelled, retrying, _queued = requested
    for attempt in (completed, failed_job, retrying):
        await bus.reply(attempt, started(attempt))
    await bus.reply(completed, succeeded(completed))
    await bus.reply(failed_job, failed(failed_job, retryable=False))
    await bus.reply(retrying, failed(retrying, retryable=True))
    await bus.publish(jobs[2].follow(JobCancelRequested()), GATEWAY)
    await bus.request(user_id="dave", canvas_id=jobs[0].canvas_id)  # someone else's canvas
    for job_id, status in zip(
        ids, ("completed", "failed", "cancelled", "retry_scheduled", "queued"), strict=True
    ):
        await wait_status(service, job_id, status)
    await eventually(
        lambda: service.database.pool.fetchval("SELECT count(*) = 6 FROM jobs"),
        what="every job in the read model",
    )
    pool = service.database.pool
    before = await _read_models(pool)
    assert len(before["canvas_objects"]) == len(OBJECTS)

    replayed = await rebuild(pool)

    assert replayed == await pool.fetchval("SELECT count(*) FROM events")
    assert await _read_models(pool) == before
