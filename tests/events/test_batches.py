"""Batches: several events in one message (docs/events.md, "Batches"), each meeting its
own verdict, on the real RabbitMQ and in memory; and the BatchPublisher that sends them,
alone when one waits and together when several do."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import (
    ACK,
    ATTEMPTS_HEADER,
    ERROR_HEADER,
    Outcome,
    Retry,
)
from canvas_events.envelope import Envelope
from canvas_events.errors import PublishError
from canvas_events.publishing import BatchPublisher
from canvas_events.topology import BATCH, GATEWAY, routing_key
from tests.events.brokers import Brokers
from tests.events.memory import job_requested

BATCH_KEY = routing_key(GATEWAY, BATCH)


class Recorder:
    """Acks every event, except those it is told to fail: keeps what it was handed."""

    def __init__(self) -> None:
        self.seen: list[tuple[Envelope, AbstractIncomingMessage]] = []
        self.retry_once: set[str] = set()
        self.outage_once: set[str] = set()
        self.arrived = asyncio.Condition()

    async def __call__(self, envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        async with self.arrived:
            self.seen.append((envelope, message))
            self.arrived.notify_all()
        key = str(envelope.event_id)
        if key in self.outage_once:
            self.outage_once.discard(key)
            raise asyncpg.ReadOnlySQLTransactionError("read-only after a failover")
        if key in self.retry_once:
            self.retry_once.discard(key)
            return Retry("not yet", delay=0.05)
        return ACK

    async def wait_for(self, count: int) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.seen) >= count), 10)

    def ids(self) -> list[str]:
        return [str(envelope.event_id) for envelope, _ in self.seen]


def _batch(*envelopes: Envelope) -> list[bytes]:
    return [envelope.to_json() for envelope in envelopes]


async def test_a_batch_is_handled_event_by_event_in_order_and_acked_once(
    brokers: Brokers,
) -> None:
    recorder = Recorder()
    broker = await brokers.started(recorder)
    sent = [job_requested() for _ in range(5)]
    await broker.publish_batch(_batch(*sent), BATCH_KEY)
    await recorder.wait_for(5)
    assert recorder.ids() == [str(e.event_id) for e in sent]
    assert {message.type for _, message in recorder.seen} == {BATCH}
    assert await broker.queue_stats(brokers.topology.orchestrator.name) == (0, 1)
    assert await brokers.dead_letters(0) == []


async def test_each_event_of_a_batch_meets_its_own_verdict(brokers: Brokers) -> None:
    recorder = Recorder()
    broker = await brokers.started(recorder)
    good, retried, unknown = job_requested(), job_requested(), job_requested()
    recorder.retry_once.add(str(retried.event_id))
    unreadable = unknown.model_dump(mode="json") | {"type": "JobExploded"}
    bodies = [good.to_json(), retried.to_json(), orjson.dumps(unreadable)]
    await broker.publish_batch(bodies, BATCH_KEY)

    # The poison event goes to the dead-letter queue alone, with its own id; the
    # retried one comes back alone, with one attempt counted; the good one once.
    [dead] = await brokers.dead_letters(1)
    assert Envelope.from_json(dead.body).event_id == unknown.event_id
    assert dead.message_id == str(unknown.event_id)
    assert "JobExploded" in str(dead.headers[ERROR_HEADER])
    await recorder.wait_for(3)
    assert recorder.ids() == [str(good.event_id), str(retried.event_id), str(retried.event_id)]
    again = recorder.seen[2][1]
    assert again.type == "JobRequested" and again.message_id == str(retried.event_id)
    assert again.headers[ATTEMPTS_HEADER] == 1
    if brokers.time is not None:
        assert brokers.time.pauses == [0.05]


async def test_a_batch_with_an_event_that_met_an_outage_comes_back_whole(
    brokers: Brokers,
) -> None:
    recorder = Recorder()
    broker = await brokers.started(recorder)
    first, second = job_requested(), job_requested()
    recorder.outage_once.add(str(second.event_id))
    await broker.publish_batch(_batch(first, second), BATCH_KEY)
    await recorder.wait_for(4)
    # Redelivered as it was (consumers are idempotent: the first changes nothing twice).
    assert recorder.ids() == 2 * [str(first.event_id), str(second.event_id)]
    assert recorder.seen[2][1].type == BATCH
    assert await brokers.dead_letters(0) == []


async def test_a_batch_event_that_is_no_envelope_is_dead_lettered_alone(brokers: Brokers) -> None:
    recorder = Recorder()
    broker = await brokers.started(recorder)
    await broker.publish_batch([b'{"not": "an envelope"}'], BATCH_KEY)
    [dead] = await brokers.dead_letters(1)
    assert "not a valid envelope" in str(dead.headers[ERROR_HEADER])
    assert recorder.seen == []


# -- the publisher -----------------------------------------------------------------------


async def test_a_lone_event_goes_alone_and_events_that_wait_together_go_together(
    brokers: Brokers,
) -> None:
    recorder = Recorder()
    broker = await brokers.started(recorder)
    publisher = BatchPublisher(broker, GATEWAY)
    lone = job_requested()
    await publisher.publish(lone)
    burst = [job_requested() for _ in range(30)]
    await asyncio.gather(*(publisher.publish(envelope) for envelope in burst))
    await recorder.wait_for(31)

    assert recorder.ids() == [str(e.event_id) for e in [lone, *burst]]
    first = recorder.seen[0][1]
    assert (first.type, first.routing_key) == ("JobRequested", "gateway.JobRequested")
    # The burst was all waiting when the publisher's turn came: one message.
    kinds = {(message.type, message.routing_key) for _, message in recorder.seen[1:]}
    assert kinds == {(BATCH, BATCH_KEY)}
    assert len({id(message) for _, message in recorder.seen[1:]}) == 1


async def test_a_failed_publish_fails_every_event_it_carried(brokers: Brokers) -> None:
    broker = brokers.unstarted()  # not connected: every publish fails
    publisher = BatchPublisher(broker, GATEWAY)
    results = await asyncio.gather(
        *(publisher.publish(job_requested()) for _ in range(5)), return_exceptions=True
    )
    assert [type(result) for result in results] == 5 * [PublishError]
