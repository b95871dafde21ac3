"""The orchestrator at the edges, in-process on the real Postgres and RabbitMQ: replicas
racing on a new job, a cancel that overtakes its job, a poison message in a batch, a
read model that disagrees with its stream."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import asyncpg

from canvas_events.broker import ACK
from canvas_events.envelope import Envelope, utcnow
from canvas_events.events import GenerationProgressed, JobCancelRequested, JobRequested
from canvas_events.topology import GATEWAY
from canvas_orchestrator import domain
from tests.orchestrator.harness import Bus, eventually, stream_types, wait_status
from tests.orchestrator.test_flow import (
    OBJECTS,
    dispatched,
    dispatched_job,
    failed,
    object_count,
    started,
    succeeded,
)


def _request(job_id: object = None, *, user_id: str = "alice") -> Envelope:
    canvas_id = f"canvas-{uuid4().hex[:8]}"
    return Envelope.wrap(
        JobRequested(query="a login flowchart", canvas_id=canvas_id, priority=5),
        correlation_id=f"req-{uuid4().hex[:8]}",
        job_id=job_id or uuid4(),  # type: ignore[arg-type]
        user_id=user_id,
        canvas_id=canvas_id,
    )


async def test_two_replicas_recording_one_new_job_at_once_both_ack_and_record_it_once(start):
    first, second = await start(), await start()
    # The gateway publishes a job again for a repeated Idempotency-Key: the copies have
    # message ids of their own, and two replicas may take them at the same moment.
    requests = [_request() for _ in range(10)]
    outcomes: list[object] = []
    for request in requests:
        copy = request.model_copy(update={"event_id": uuid4()})
        outcomes += await asyncio.gather(
            first.handler.handle_envelope(request),
            second.handler.handle_envelope(copy),
            return_exceptions=True,
        )

    assert [o for o in outcomes if o is not ACK] == []
    for request in requests:
        assert request.job_id is not None
        assert (await stream_types(first, request.job_id))[:3] == [
            "JobRequested",
            "JobQueued",
            "GenerationRequested",
        ]


async def test_a_cancel_recorded_before_its_job_cancels_the_job_when_it_arrives(start, bus: Bus):
    service = await start()
    request = _request()
    job_id = request.job_id
    assert job_id is not None
    cancel = request.follow(JobCancelRequested(reason="changed my mind"))

    # Another replica consumed the cancel first: it must be kept, not dropped.
    assert await service.handler.handle_envelope(cancel) is ACK
    assert await service.handler.handle_envelope(request) is ACK

    row = await wait_status(service, job_id, "cancelled")
    assert row["attempt"] == 0  # no attempt dispatched: the model is never called
    assert await stream_types(service, job_id) == [
        "JobRequested",
        "JobCancelRequested",
        "JobCancelled",
    ]
    await bus.wait_for(job_id, "JobCancelled")
    assert bus.of(job_id, "GenerationRequested") == []
    recorded = await service.database.pool.fetchrow(
        "SELECT causation_id, correlation_id FROM events "
        "WHERE stream_id = $1 AND type = 'JobCancelRequested'",
        job_id,
    )
    assert recorded is not None
    # Recorded as caused by the cancel the user sent, in its correlation.
    assert recorded["causation_id"] == cancel.event_id
    assert recorded["correlation_id"] == cancel.correlation_id


async def request_cancel(service, request: Envelope) -> Envelope:
    """Write a cancel request as the gateway does before it answers 202."""
    cancel = request.follow(JobCancelRequested(reason="stop"))
    await service.database.pool.execute(
        "INSERT INTO cancel_requests (job_id, envelope) VALUES ($1, $2)",
        request.job_id,
        cancel.model_dump(mode="json"),
    )
    return cancel


async def test_a_cancel_requested_before_the_result_wins_over_it(start, bus: Bus):
    service = await start()
    request, job_id, requested = await dispatched_job(bus)
    await service.handler.handle_envelope(requested.follow(started(requested)))
    await wait_status(service, job_id, "processing")

    # The 202 was answered; the cancel message is still on its way when the result comes.
    await request_cancel(service, request)
    assert await service.handler.handle_envelope(requested.follow(succeeded(requested))) is ACK

    row = await wait_status(service, job_id, "cancelled")
    assert row["result"] is None
    assert await object_count(service, job_id) == 0
    assert (await stream_types(service, job_id))[-2:] == ["JobCancelRequested", "JobCancelled"]
    left = await service.database.pool.fetchval("SELECT count(*) FROM cancel_requests")
    assert left == 0


async def test_a_cancel_requested_while_a_retry_waits_wins_over_the_retry(start, bus: Bus):
    service = await start(retry_backoff_unit_seconds=0.3, max_job_retries=2)
    request, job_id, requested = await dispatched_job(bus)
    await service.handler.handle_envelope(requested.follow(started(requested)))
    await service.handler.handle_envelope(requested.follow(failed(requested, retryable=True)))
    await wait_status(service, job_id, "retry_scheduled")

    await request_cancel(service, request)

    await wait_status(service, job_id, "cancelled")
    assert (await stream_types(service, job_id)).count("GenerationRequested") == 1


async def test_a_kept_cancel_from_someone_else_does_not_cancel_the_job(start):
    service = await start()
    request = _request(user_id="alice")
    assert request.job_id is not None
    forged = request.follow(JobCancelRequested(), user_id="mallory")

    assert await service.handler.handle_envelope(forged) is ACK
    assert await service.handler.handle_envelope(request) is ACK

    await wait_status(service, request.job_id, "queued")


async def test_a_message_the_database_client_refuses_is_dead_lettered_not_requeued_forever(
    start, bus: Bus, amqp_url, topology, monkeypatch
):
    service = await start()
    jobs = []
    for _ in range(3):
        _, job_id, requested = await dispatched_job(bus)
        await bus.reply(requested, started(requested))
        jobs.append((job_id, requested))
    for job_id, _ in jobs:
        await wait_status(service, job_id, "processing")
    poison_job = jobs[0][0]
    real_progress = domain.progress

    def progress(state: domain.JobState, event: GenerationProgressed) -> list[Any]:
        if state.job_id == poison_job and event.index == 1:
            # What asyncpg raises for a value it cannot encode: an InterfaceError that
            # says nothing about the connection, and comes back on every try.
            raise asyncpg.InterfaceError("invalid input for query argument $11")
        return real_progress(state, event)

    monkeypatch.setattr(domain, "progress", progress)
    await asyncio.gather(
        *(
            bus.reply(
                requested,
                GenerationProgressed(
                    attempt_id=requested.data["attempt_id"], index=index, object=OBJECTS[0]
                ),
            )
            for index in range(3)
            for _, requested in jobs
        )
    )

    async def progressed(job_id: UUID, count: int) -> bool:
        return (await stream_types(service, job_id)).count("GenerationProgressed") == count

    async def others_progressed() -> bool:
        return all([await progressed(job_id, 3) for job_id, _ in jobs[1:]])

    await eventually(others_progressed, what="the other jobs' objects")
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        dlq = await channel.declare_queue(topology.orchestrator.dead_letter_queue, passive=True)

        async def dead_lettered() -> aio_pika.abc.AbstractIncomingMessage | None:
            return await dlq.get(fail=False)

        dead = await eventually(dead_lettered, timeout=30, what="the poison message's DLQ entry")
        assert Envelope.from_json(dead.body).data["index"] == 1
    assert await progressed(poison_job, 2)


async def test_a_timer_row_that_disagrees_with_its_stream_is_skipped_and_others_fire(start, bus):
    service = await start(retry_backoff_unit_seconds=0.2, max_job_retries=2)
    # A job whose read model wrongly says a retry is due (its stream says queued)...
    _, broken_id, _ = await dispatched_job(bus)
    await service.database.pool.execute(
        "UPDATE jobs SET status = 'retry_scheduled', next_attempt_at = $2 WHERE id = $1",
        broken_id,
        utcnow() - timedelta(hours=1),
    )
    # ...ahead of a job whose retry is really due.
    _, job_id, requested = await dispatched_job(bus)
    await bus.reply(requested, started(requested))
    await bus.reply(requested, failed(requested, retryable=True))

    await dispatched(bus, job_id, attempt=2)
    assert (await stream_types(service, job_id)).count("GenerationRequested") == 2


async def test_a_cancel_published_right_behind_its_request_wins(start, bus: Bus):
    """Both through the broker, as the gateway sends them, to two replicas."""
    await start()
    await start()
    cancels = []
    for _ in range(10):
        request = await bus.request()
        cancel = request.follow(JobCancelRequested(reason="at once"))
        await bus.publish(cancel, GATEWAY)
        cancels.append(request)
    for request in cancels:
        assert request.job_id is not None
        await bus.wait_for(request.job_id, "JobCancelled")
