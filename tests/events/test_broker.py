"""The Broker on the real RabbitMQ: confirms, outcomes, dead letters, reconnects."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import ACK, ERROR_HEADER, Broker, Consumer, Outcome, Retry
from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage, PublishError
from canvas_events.events import JobRequested, parse_event
from canvas_events.topology import Topology, routing_key
from tests.support.waiting import eventually


def _job_requested(query: str = "draw a box") -> Envelope:
    return Envelope.wrap(
        JobRequested(query=query, canvas_id="c", priority=5),
        correlation_id="test",
        job_id=uuid.uuid4(),
        user_id="alice",
    )


@pytest.fixture
async def raw_channel(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield await connection.channel()


async def _started(amqp_url: str, topology: Topology, handler: Callable[..., object]) -> Broker:
    broker = Broker(amqp_url, topology, connection_name="test")
    broker.add_consumer(
        Consumer(topology.orchestrator, handler, prefetch=4, max_attempts=3, retry_delay=0.05)  # type: ignore[arg-type]
    )
    await broker.start()
    await broker.wait_connected(10)
    return broker


async def _get(
    channel: aio_pika.abc.AbstractChannel, queue: str, timeout: float = 10
) -> AbstractIncomingMessage:
    q = await channel.declare_queue(queue, passive=True)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        message = await q.get(fail=False)
        if message is not None:
            await message.ack()
            return message
        assert asyncio.get_running_loop().time() < deadline, f"nothing arrived on {queue}"
        await asyncio.sleep(0.02)


async def test_published_message_is_consumed_and_acked(amqp_url: str, topology: Topology) -> None:
    seen: asyncio.Queue[Envelope] = asyncio.Queue()

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        await seen.put(envelope)
        return ACK

    broker = await _started(amqp_url, topology, handler)
    try:
        sent = _job_requested()
        await broker.publish(sent, routing_key("gateway", "JobRequested"))
        got = await asyncio.wait_for(seen.get(), 10)
        assert got == sent
        assert isinstance(parse_event(got), JobRequested)
        stats = await broker.queue_stats(topology.orchestrator.name)
        assert stats is not None
        assert stats[1] == 1  # our consumer
    finally:
        await broker.stop()


async def test_unparseable_message_is_dead_lettered_with_reason_and_consumer_goes_on(
    amqp_url: str, topology: Topology, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    seen: asyncio.Queue[Envelope] = asyncio.Queue()

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        parse_event(envelope)
        await seen.put(envelope)
        return ACK

    broker = await _started(amqp_url, topology, handler)
    try:
        exchange = await raw_channel.get_exchange(topology.exchange)
        await exchange.publish(aio_pika.Message(b"{not json"), "gateway.JobRequested")
        bad = _job_requested().model_dump(mode="json")
        bad["type"] = "JobExploded"
        await exchange.publish(
            aio_pika.Message(Envelope.model_validate(bad).to_json()), "gateway.JobRequested"
        )
        good = _job_requested()
        await broker.publish(good, "gateway.JobRequested")
        assert (await asyncio.wait_for(seen.get(), 10)).event_id == good.event_id

        dlq = topology.orchestrator.dead_letter_queue
        first = await _get(raw_channel, dlq)
        second = await _get(raw_channel, dlq)
        reasons = sorted(str(m.headers[ERROR_HEADER]) for m in (first, second))
        assert "not JSON" in reasons[0] or "not JSON" in reasons[1]
        assert any("JobExploded" in reason for reason in reasons)
        assert first.body == b"{not json"
    finally:
        await broker.stop()


async def test_handler_that_keeps_failing_is_dead_lettered_after_max_attempts(
    amqp_url: str, topology: Topology, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    calls = 0

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug in handler")

    broker = await _started(amqp_url, topology, handler)
    try:
        await broker.publish(_job_requested(), "gateway.JobRequested")
        dead = await _get(raw_channel, topology.orchestrator.dead_letter_queue)
        assert "failed 3 times" in str(dead.headers[ERROR_HEADER])
        assert "bug in handler" in str(dead.headers[ERROR_HEADER])
        assert calls == 3
        # Retries republish through the default exchange; the original key is kept.
        assert dead.headers["x-canvas-routing-key"] == "gateway.JobRequested"
    finally:
        await broker.stop()


async def test_retry_outcome_redelivers_until_the_handler_succeeds(
    amqp_url: str, topology: Topology
) -> None:
    attempts: list[int] = []
    done = asyncio.Event()

    async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        attempts.append(1)
        if len(attempts) < 2:
            return Retry("not yet", delay=0.01)
        done.set()
        return ACK

    broker = await _started(amqp_url, topology, handler)
    try:
        await broker.publish(_job_requested(), "gateway.JobRequested")
        await asyncio.wait_for(done.wait(), 10)
        assert len(attempts) == 2
    finally:
        await broker.stop()


async def test_poison_raised_by_handler_is_dead_lettered(
    amqp_url: str, topology: Topology, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        raise PoisonMessage("canvas_id is not allowed here")

    broker = await _started(amqp_url, topology, handler)
    try:
        await broker.publish(_job_requested(), "gateway.JobRequested")
        dead = await _get(raw_channel, topology.orchestrator.dead_letter_queue)
        assert dead.headers[ERROR_HEADER] == "canvas_id is not allowed here"
    finally:
        await broker.stop()


async def test_publish_without_a_broker_fails_fast_and_clearly(topology: Topology) -> None:
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", topology, connection_name="test")
    await broker.start()
    try:
        with pytest.raises(PublishError, match="not connected"):
            await broker.publish(_job_requested(), "gateway.JobRequested")
        assert not broker.connected
    finally:
        await broker.stop()


async def test_consumer_comes_back_after_its_connection_is_killed(
    amqp_url: str, topology: Topology
) -> None:
    seen: asyncio.Queue[Envelope] = asyncio.Queue()

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        await seen.put(envelope)
        return ACK

    broker = await _started(amqp_url, topology, handler)
    try:
        assert broker._connection is not None
        # What a broker restart looks like from here: the connection drops under us.
        await broker._connection.close()
        deadline = asyncio.get_running_loop().time() + 10
        while broker.connect_count < 2:
            assert asyncio.get_running_loop().time() < deadline, "never reconnected"
            await asyncio.sleep(0.05)
        sent = _job_requested()
        await broker.publish(sent, "gateway.JobRequested")
        assert (await asyncio.wait_for(seen.get(), 10)).event_id == sent.event_id
    finally:
        await broker.stop()


async def test_a_message_no_queue_takes_is_an_error_unless_it_may_reach_none(
    amqp_url: str, topology: Topology
) -> None:
    broker = Broker(amqp_url, topology, connection_name="test")
    await broker.start()
    await broker.wait_connected(10)
    try:
        with pytest.raises(PublishError, match="no queue took the message"):
            await broker.publish(_job_requested(), "nobody.listens")
        # Events for per-process queues that may all be away are published all the same.
        await broker.publish(_job_requested(), "nobody.listens", mandatory=False)
    finally:
        await broker.stop()


async def test_a_consumer_whose_queue_an_operator_deleted_declares_it_again_and_consumes(
    amqp_url: str, topology: Topology, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    seen: asyncio.Queue[Envelope] = asyncio.Queue()

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        await seen.put(envelope)
        return ACK

    broker = await _started(amqp_url, topology, handler)
    try:
        await raw_channel.queue_delete(topology.orchestrator.name)
        deadline = asyncio.get_running_loop().time() + 10
        while broker.connect_count < 2 or not broker.connected:
            assert asyncio.get_running_loop().time() < deadline, "the consumer never came back"
            await asyncio.sleep(0.05)
        sent = _job_requested()
        await broker.publish(sent, "gateway.JobRequested")
        assert (await asyncio.wait_for(seen.get(), 10)).event_id == sent.event_id
    finally:
        await broker.stop()


async def test_a_deleted_queue_nobody_consumes_is_declared_again_within_seconds(
    amqp_url: str, topology: Topology, raw_channel: aio_pika.abc.AbstractChannel
) -> None:
    broker = Broker(amqp_url, topology, connection_name="test", topology_interval=0.2)
    await broker.start()
    await broker.wait_connected(10)
    try:
        dlq = topology.orchestrator.dead_letter_queue
        await raw_channel.queue_delete(dlq)

        async def declared_again() -> bool:
            return await broker.queue_stats(dlq) is not None

        await eventually(declared_again, timeout=10, what="the dead-letter queue again")
    finally:
        await broker.stop()


async def test_a_handler_meeting_a_database_outage_is_retried_past_max_attempts_never_dead_lettered(
    amqp_url: str, topology: Topology
) -> None:
    calls = 0
    done = asyncio.Event()

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        nonlocal calls
        calls += 1
        if calls <= 5:  # more than the consumer's max_attempts (3)
            raise asyncpg.ReadOnlySQLTransactionError(
                "cannot execute INSERT in a read-only transaction"
            )
        done.set()
        return ACK

    broker = await _started(amqp_url, topology, handler)
    try:
        await broker.publish(_job_requested(), "gateway.JobRequested")
        await asyncio.wait_for(done.wait(), 20)
        assert calls == 6
        stats = await broker.queue_stats(topology.orchestrator.dead_letter_queue)
        assert stats is not None and stats[0] == 0
    finally:
        await broker.stop()
