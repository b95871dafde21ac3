"""The outbox relay on the real Postgres and RabbitMQ: order, positions, one active
relay at a time, and nothing lost while the database or the broker is away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from uuid import UUID, uuid4

import pytest
import structlog

from canvas_events import tracing
from canvas_events.broker import Broker
from canvas_events.envelope import Envelope, utcnow
from canvas_events.events import GenerationRequested, JobQueued
from canvas_events.testing import recorded_spans
from canvas_orchestrator import relay as relay_module
from canvas_orchestrator.metrics import Metrics
from canvas_orchestrator.relay import (
    APPLICATION_NAME,
    CHECKPOINT,
    HELD_BACK_SECONDS,
    RELAY_LOCK_KEY,
    Relay,
    next_read_in,
)
from canvas_store.events import Append, RecordedEvent, append, append_streams
from tests.orchestrator.harness import eventually
from tests.support.env import transaction_in_another_database


@dataclass
class Made:
    relay: Relay
    broker: Broker
    metrics: Metrics


MakeRelay = Callable[[], Made]


@pytest.fixture
async def make_relay(database_url, amqp_url, topology) -> AsyncIterator[MakeRelay]:
    """Relays made by the test, each with a broker of its own (not started); all stopped
    afterwards."""
    made: list[Made] = []

    def make() -> Made:
        broker = Broker(amqp_url, topology, connection_name=f"relay-test-{uuid4().hex[:6]}")
        metrics = Metrics()
        made.append(Made(Relay(database_url, broker, metrics, poll_interval=0.1), broker, metrics))
        return made[-1]

    yield make
    for item in made:
        await item.relay.stop()
        await item.broker.stop()


async def record(pool, stream_id: UUID | None = None, count: int = 1) -> list[RecordedEvent]:
    stream_id = stream_id or uuid4()
    envelopes = [
        Envelope.wrap(
            JobQueued(priority=5, retry_count=n),
            correlation_id="corr",
            job_id=stream_id,
            user_id="alice",
        )
        for n in range(count)
    ]
    async with pool.acquire() as conn, conn.transaction():
        return await append(conn, stream_id, 0, envelopes)


async def started(made: Made) -> Relay:
    await made.broker.start()
    await made.broker.wait_connected(15)
    await made.relay.start()
    return made.relay


async def checkpoint(pool) -> int:
    value = await pool.fetchval(
        "SELECT COALESCE((SELECT position FROM relay_checkpoints WHERE name = $1), 0)", CHECKPOINT
    )
    return int(value)


async def test_relay_publishes_every_event_in_position_order_with_its_position(
    pool, bus, make_relay
):
    recorded = []
    for _ in range(3):
        recorded += await record(pool, count=3)
    relay = await started(make_relay())

    async def all_seen() -> bool:
        return len(bus.seen) >= len(recorded)

    await eventually(all_seen, what="every event published")
    assert [seen.envelope.position for seen in bus.seen] == [item.position for item in recorded]
    assert [seen.envelope.event_id for seen in bus.seen] == [
        item.envelope.event_id for item in recorded
    ]
    assert {seen.routing_key for seen in bus.seen} == {"job.JobQueued"}

    async def caught_up() -> bool:
        return await checkpoint(pool) == recorded[-1].position

    await eventually(caught_up, what="the checkpoint to reach the last event")
    assert relay.active


async def test_generation_requested_is_published_with_the_jobs_priority(pool, bus, make_relay):
    stream_id = uuid4()
    envelope = Envelope.wrap(
        GenerationRequested(
            attempt_id=uuid4(), attempt=1, query="q", priority=9, lease_expires_at=utcnow()
        ),
        correlation_id="corr",
        job_id=stream_id,
        user_id="alice",
    )
    async with pool.acquire() as conn, conn.transaction():
        await append(conn, stream_id, 0, [envelope])
    await started(make_relay())

    seen = (await bus.wait_for(stream_id, "GenerationRequested"))[0]

    assert seen.priority == 9
    assert seen.routing_key == "job.GenerationRequested"


async def test_relay_publishes_each_event_in_the_trace_it_was_recorded_in(pool, bus, make_relay):
    # Three jobs' status events: relayed together as one job.Batch, each in its own trace.
    jobs = [uuid4() for _ in range(3)]
    with recorded_spans() as exporter:
        parents = []
        for _ in jobs:
            with tracing.span("process JobRequested", root=True):
                parents.append(tracing.current_traceparent())
        async with pool.acquire() as conn, conn.transaction():
            await append_streams(
                conn,
                [
                    Append(job_id, 0, [_queued(job_id)], [parent])
                    for job_id, parent in zip(jobs, parents, strict=True)
                ],
            )
        await started(make_relay())
        seen = [(await bus.wait_for(job_id, "JobQueued"))[0] for job_id in jobs]
        spans = {span.context.span_id: span for span in exporter.get_finished_spans()}

    for parent, message in zip(parents, seen, strict=True):
        # The message carries its publish span, the child of the span that recorded it.
        trace_id, span_id = _ids(message.traceparent)
        publish = spans[span_id]
        assert publish.name == "publish JobQueued"
        assert publish.parent is not None
        assert (trace_id, publish.parent.span_id) == _ids(parent)


def _ids(traceparent: str | None) -> tuple[int, int]:
    """The trace id and span id a traceparent names."""
    assert traceparent is not None
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def _queued(job_id: UUID) -> Envelope:
    return Envelope.wrap(
        JobQueued(priority=5, retry_count=0), correlation_id="corr", job_id=job_id, user_id="a"
    )


async def test_only_one_relay_is_active_and_a_standby_takes_over_when_it_stops(
    pool, bus, make_relay
):
    first = await started(make_relay())
    await eventually(lambda: _true(first.active), what="the first relay to be active")
    second = await started(make_relay())

    async def both_connected() -> bool:
        count = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND datname = current_database()",
            APPLICATION_NAME,
        )
        return bool(count == 2)

    await eventually(both_connected, what="both relays connected")
    assert first.active and not second.active
    holders = await pool.fetchval(
        # Advisory locks are per database: count this test's database only (other
        # orchestrators may run on the same server).
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND ((classid::bigint << 32) | objid::bigint) = $1",
        RELAY_LOCK_KEY,
    )
    assert holders == 1

    await first.stop()
    await eventually(lambda: _true(second.active), what="the standby to take over")
    recorded = await record(pool)
    seen = await bus.wait_for(recorded[0].stream_id, "JobQueued")
    assert seen[0].envelope.position == recorded[0].position


async def test_relay_comes_back_after_its_database_connection_is_killed(pool, bus, make_relay):
    relay = await started(make_relay())
    await eventually(lambda: _true(relay.active), what="the relay to be active")

    killed = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = $1 AND datname = current_database()",
        APPLICATION_NAME,
    )
    assert killed == 1
    recorded = await record(pool)

    await bus.wait_for(recorded[0].stream_id, "JobQueued")


async def test_events_wait_in_the_store_until_the_broker_confirms_them(pool, bus, make_relay):
    made = make_relay()
    await made.relay.start()  # its broker is not connected: every publish fails
    recorded = await record(pool, count=4)
    metrics = made.metrics

    async def lag_measured() -> bool:
        return bool(metrics.registry.get_sample_value("canvas_outbox_lag_events") == 4)

    await eventually(lag_measured, what="the lag to show the waiting events")
    assert await checkpoint(pool) == 0

    await made.broker.start()

    seen = await bus.wait_for(recorded[0].stream_id, "JobQueued", 4)
    assert [item.envelope.position for item in seen] == [item.position for item in recorded]

    async def caught_up() -> bool:
        return await checkpoint(pool) == recorded[-1].position

    await eventually(caught_up, what="the checkpoint to move")


async def _true(value: bool) -> bool:
    return value


def test_a_relay_held_back_reads_again_soon_then_backs_off_to_its_poll_interval() -> None:
    assert next_read_in(0, 1.0) == 1.0  # nothing held back: woken by NOTIFY, or polls
    waits = [next_read_in(reads, 1.0) for reads in range(1, 12)]
    assert waits[0] == HELD_BACK_SECONDS
    assert waits == sorted(waits)
    assert waits[-1] == 1.0
    # An operator's transaction open for hours: still the poll interval, no overflow.
    assert next_read_in(100_000, 1.0) == 1.0


_HELD_BY_ANOTHER = "relay held back by a transaction open in another database; reading past it"


async def test_a_transaction_left_open_in_another_database_does_not_stop_the_relay(
    pool, bus, make_relay, database_url, monkeypatch: pytest.MonkeyPatch
):
    """A write transaction idle in another database of the cluster is older than every
    event recorded after it: the cluster's bound holds them back, and after a few reads
    that find nothing settled the relay leaves other databases' transactions out."""
    # A logger first used under capture_logs (loggers cache their configuration).
    monkeypatch.setattr(relay_module, "log", structlog.get_logger("canvas_orchestrator.relay"))
    relay = await started(make_relay())
    async with transaction_in_another_database(database_url):
        with structlog.testing.capture_logs() as logs:
            recorded = await record(pool, count=2)
            seen = await bus.wait_for(recorded[0].stream_id, "JobQueued", 2)
        assert [item.envelope.position for item in seen] == [item.position for item in recorded]
        assert [entry["event"] for entry in logs].count(_HELD_BY_ANOTHER) == 1
        assert relay.active


async def test_a_transaction_open_in_this_database_still_holds_the_relay_back(
    pool, bus, make_relay, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(relay_module, "log", structlog.get_logger("canvas_orchestrator.relay"))
    await started(make_relay())
    async with pool.acquire() as slow:
        transaction = slow.transaction()
        await transaction.start()
        await slow.fetchval("SELECT pg_current_xact_id()")
        with structlog.testing.capture_logs() as logs:
            recorded = await record(pool, count=2)
            await asyncio.sleep(0.5)  # the relay reads again 5, 10, 20, 40 ... ms apart
            assert not bus.of(recorded[0].stream_id)
        assert _HELD_BY_ANOTHER not in [entry["event"] for entry in logs]
        await transaction.rollback()
    seen = await bus.wait_for(recorded[0].stream_id, "JobQueued", 2)
    assert [item.envelope.position for item in seen] == [item.position for item in recorded]
