"""The in-memory broker: the outcomes of tests/events/test_broker.py (which runs the real
Broker on RabbitMQ), and what it models of RabbitMQ (routing, priorities, prefetch,
stopping), with no broker running. Pauses go to a fake clock: these tests take
milliseconds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import structlog
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import (
    ACK,
    ATTEMPTS_HEADER,
    DEAD_LETTERED_AT_HEADER,
    ERROR_HEADER,
    QUEUE_HEADER,
    ROUTING_KEY_HEADER,
    Consumer,
    DeadLetter,
    Outcome,
    Retry,
)
from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage, PublishError
from canvas_events.events import JobCancelled, JobRequested, parse_event
from canvas_events.testing import InMemoryBroker, topic_matches
from canvas_events.topology import QueueSpec, Topology, routing_key
from tests.events.memory import FakeTime, generation_requested, job_requested

TOPOLOGY = Topology(prefix="mem")


def _started_broker(
    handler: Callable[..., Any],
    time: FakeTime,
    queue: QueueSpec = TOPOLOGY.orchestrator,
    **consumer: Any,
) -> InMemoryBroker:
    """A broker with one consumer as test_broker.py's (3 attempts, 0.05 s apart)."""
    broker = InMemoryBroker(TOPOLOGY, sleep=time.sleep, clock=time.clock)
    options: dict[str, Any] = {"prefetch": 4, "max_attempts": 3, "retry_delay": 0.05}
    broker.add_consumer(Consumer(queue, handler, **{**options, **consumer}))
    return broker


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


def reasons(broker: InMemoryBroker, queue: QueueSpec = TOPOLOGY.orchestrator) -> list[str]:
    return [str(m.headers[ERROR_HEADER]) for m in broker.dead_letters(queue)]


# -- the outcomes of test_broker.py ------------------------------------------------------


async def test_published_message_is_consumed_and_acked(time: FakeTime) -> None:
    seen: list[tuple[Envelope, AbstractIncomingMessage]] = []

    async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        seen.append((envelope, message))
        return ACK

    broker = _started_broker(handler, time)
    await broker.start()
    sent = job_requested()
    await broker.publish(sent, routing_key("gateway", "JobRequested"))
    await broker.wait_idle()

    [(got, message)] = seen
    assert got == sent
    assert isinstance(parse_event(got), JobRequested)
    assert (message.routing_key, message.message_id) == ("gateway.JobRequested", str(sent.event_id))
    assert (message.type, message.correlation_id) == ("JobRequested", sent.correlation_id)
    assert not message.redelivered
    assert await broker.queue_stats(TOPOLOGY.orchestrator.name) == (0, 1)
    assert broker.dead_letters(TOPOLOGY.orchestrator) == []
    assert [p.routing_key for p in broker.published] == ["gateway.JobRequested"]
    await broker.stop()


async def test_unreadable_messages_are_dead_lettered_before_the_handler_runs_and_it_goes_on(
    time: FakeTime,
) -> None:
    seen: list[Envelope] = []

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        seen.append(envelope)
        return ACK

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish_raw(b"{not json", "gateway.JobRequested")
    unknown = job_requested().model_dump(mode="json")
    unknown["type"] = "JobExploded"
    await broker.publish_raw(Envelope.model_validate(unknown).to_json(), "gateway.JobRequested")
    newer = job_requested().model_copy(update={"schema_version": 99})
    await broker.publish(newer, "gateway.JobRequested")
    good = job_requested()
    await broker.publish(good, "gateway.JobRequested")
    await broker.wait_idle()

    assert seen == [good]
    dead = broker.dead_letters(TOPOLOGY.orchestrator)
    assert [m.body for m in dead][:1] == [b"{not json"]
    not_json, exploded, future = reasons(broker)
    assert "not JSON" in not_json
    assert "JobExploded" in exploded
    assert "newer than this build's" in future
    for message in dead:
        assert message.headers[QUEUE_HEADER] == TOPOLOGY.orchestrator.name
        assert message.headers[ROUTING_KEY_HEADER] == "gateway.JobRequested"
        assert datetime.fromisoformat(str(message.headers[DEAD_LETTERED_AT_HEADER]))
        assert message.routing_key == TOPOLOGY.orchestrator.dead_letter_queue
    await broker.stop()


async def test_handler_that_keeps_failing_is_dead_lettered_after_max_attempts(
    time: FakeTime,
) -> None:
    deliveries: list[AbstractIncomingMessage] = []

    async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        deliveries.append(message)
        raise RuntimeError("bug in handler")

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish(job_requested(), "gateway.JobRequested")
    await broker.wait_idle()

    [dead] = broker.dead_letters(TOPOLOGY.orchestrator)
    assert "failed 3 times" in str(dead.headers[ERROR_HEADER])
    assert "bug in handler" in str(dead.headers[ERROR_HEADER])
    assert len(deliveries) == 3
    # Retries republish through the default exchange; the original key is kept.
    assert dead.headers["x-canvas-routing-key"] == "gateway.JobRequested"
    assert [m.routing_key for m in deliveries] == ["gateway.JobRequested"] + 2 * [
        TOPOLOGY.orchestrator.name
    ]
    assert [(m.headers or {}).get(ATTEMPTS_HEADER) for m in deliveries] == [None, 1, 2]
    assert len({m.message_id for m in deliveries}) == 1
    assert time.pauses == [0.05, 0.05]  # the consumer's retry_delay before each retry
    await broker.stop()


async def test_retry_outcome_redelivers_after_its_delay_until_the_handler_succeeds(
    time: FakeTime,
) -> None:
    attempts: list[AbstractIncomingMessage] = []

    async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        attempts.append(message)
        if len(attempts) < 2:
            return Retry("not yet", delay=0.25)
        return ACK

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish(job_requested(), "gateway.JobRequested")
    await broker.wait_idle()
    assert len(attempts) == 2
    assert attempts[1].headers[ATTEMPTS_HEADER] == 1
    assert time.pauses == [0.25]
    assert broker.dead_letters(TOPOLOGY.orchestrator) == []
    await broker.stop()


async def test_poison_raised_by_handler_is_dead_lettered(time: FakeTime) -> None:
    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        raise PoisonMessage("canvas_id is not allowed here")

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish(job_requested(), "gateway.JobRequested")
    await broker.wait_idle()
    assert reasons(broker) == ["canvas_id is not allowed here"]
    await broker.stop()


async def test_publish_without_a_started_broker_fails_fast_and_clearly(time: FakeTime) -> None:
    broker = InMemoryBroker(TOPOLOGY)
    with pytest.raises(PublishError, match="not connected"):
        await broker.publish(job_requested(), "gateway.JobRequested")
    assert not broker.connected
    await broker.start()
    await broker.wait_connected(1)
    await broker.stop()
    with pytest.raises(PublishError, match="not connected"):
        await broker.publish(job_requested(), "gateway.JobRequested")


async def test_a_message_no_queue_takes_is_an_error_unless_it_may_reach_none() -> None:
    broker = InMemoryBroker(TOPOLOGY)
    await broker.start()
    with pytest.raises(PublishError, match="no queue took the message"):
        await broker.publish(job_requested(), "nobody.listens")
    # Events for per-process queues that may all be away are published all the same.
    await broker.publish(job_requested(), "nobody.listens", mandatory=False)
    assert [(p.routing_key, p.mandatory) for p in broker.published] == [("nobody.listens", False)]
    await broker.stop()


async def test_a_handler_meeting_a_database_outage_is_retried_past_max_attempts_never_dead_lettered(
    time: FakeTime,
) -> None:
    deliveries: list[AbstractIncomingMessage] = []

    async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        deliveries.append(message)
        if len(deliveries) <= 5:  # more than the consumer's max_attempts (3)
            raise asyncpg.ReadOnlySQLTransactionError(
                "cannot execute INSERT in a read-only transaction"
            )
        return ACK

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish(job_requested(), "gateway.JobRequested")
    await broker.wait_idle()
    assert len(deliveries) == 6
    assert broker.dead_letters(TOPOLOGY.orchestrator) == []
    assert await broker.queue_stats(TOPOLOGY.orchestrator.dead_letter_queue) == (0, 0)
    # Requeued as it was: redelivered, with no try counted.
    assert [m.redelivered for m in deliveries] == [False] + 5 * [True]
    assert all(ATTEMPTS_HEADER not in (m.headers or {}) for m in deliveries)
    await broker.stop()


# -- more of the same consumer code ------------------------------------------------------


async def test_dead_letter_returned_by_the_handler_is_dead_lettered_at_once(
    time: FakeTime,
) -> None:
    calls = 0

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        nonlocal calls
        calls += 1
        return DeadLetter("this job asks for the impossible")

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish(job_requested(), "gateway.JobRequested")
    await broker.wait_idle()
    assert calls == 1
    assert reasons(broker) == ["this job asks for the impossible"]
    await broker.stop()


async def test_a_dead_letter_reason_is_redacted_and_cut_short(time: FakeTime) -> None:
    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        raise PoisonMessage("cannot reach amqp://guest:hunter22@rabbit/ " + "x" * 2000)

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish(job_requested(), "gateway.JobRequested")
    await broker.wait_idle()
    [reason] = reasons(broker)
    assert "hunter22" not in reason
    assert "amqp://guest:***@rabbit/" in reason
    assert len(reason) == 1000
    await broker.stop()


async def test_an_outage_pause_grows_with_the_outage_up_to_the_limit_and_resets_after(
    time: FakeTime,
) -> None:
    failing = 12

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        nonlocal failing
        if failing:
            failing -= 1
            raise ConnectionResetError("connection reset by peer")
        return ACK

    broker = _started_broker(handler, time, retry_delay=1.0, max_outage_delay=4.0)
    await broker.start()
    await broker.publish(job_requested(), "gateway.JobRequested")
    await broker.wait_idle()
    assert len(time.pauses) == 12
    assert 0.8 <= time.pauses[0] <= 1.2  # at least retry_delay, with jitter
    assert all(0.8 <= pause <= 4.8 for pause in time.pauses)
    assert time.pauses[-1] >= 3.2  # half an outage of 10 s and more: the limit
    # The handler succeeded: the next outage starts from retry_delay again.
    failing = 1
    await broker.publish(job_requested(), "gateway.JobRequested")
    await broker.wait_idle()
    assert 0.8 <= time.pauses[-1] <= 1.2
    await broker.stop()


async def test_handlers_log_with_the_job_and_the_event_type_bound(time: FakeTime) -> None:
    bound: list[dict[str, Any]] = []

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        bound.append(structlog.contextvars.get_contextvars())
        return ACK

    broker = _started_broker(handler, time)
    await broker.start()
    sent = job_requested()
    await broker.publish(sent, "gateway.JobRequested")
    await broker.wait_idle()
    assert bound == [
        {
            "job_id": str(sent.job_id),
            "correlation_id": sent.correlation_id,
            "event_type": "JobRequested",
        }
    ]
    await broker.stop()


async def test_a_dead_letter_no_queue_takes_keeps_the_message(time: FakeTime) -> None:
    # A consumer whose dead-letter queue the topology does not declare: as on RabbitMQ,
    # the dead-letter exchange routes it nowhere, and the message stays in its queue.
    spec = QueueSpec("mem.side", ("side.#",), "mem.side.dlq")
    calls = 0
    third_try = asyncio.Event()

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        nonlocal calls
        calls += 1
        if calls == 3:
            third_try.set()
        return DeadLetter("nowhere to go")

    broker = _started_broker(handler, time, queue=spec, prefetch=1)
    await broker.start()
    await broker.publish(job_requested(), "side.JobRequested")
    await asyncio.wait_for(third_try.wait(), 5)
    await broker.stop(drain_timeout=0)
    [kept] = broker.messages("mem.side")
    assert kept.redelivered
    assert time.pauses[:2] == [0.05, 0.05]  # retry_delay before each try


# -- what it models of RabbitMQ ----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("job.*", "job.JobQueued", True),
        ("job.*", "job", False),
        ("job.*", "job.a.b", False),
        ("job.#", "job.a.b", True),
        ("job.#", "job", True),
        ("#", "gateway.JobRequested", True),
        ("*.JobCancelled", "job.JobCancelled", True),
        ("gateway.*", "generator.GenerationStarted", False),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("#.b", "b", True),
        ("a.*.#", "a", False),
        ("job.GenerationRequested", "job.GenerationRequested", True),
        ("job.GenerationRequested", "job.GenerationRequestedLater", False),
    ],
)
def test_topic_patterns_route_as_rabbitmq_does(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


async def test_each_message_reaches_every_queue_the_topology_binds_to_its_key(
    time: FakeTime,
) -> None:
    got: dict[str, list[str]] = {}

    def consumer(spec: QueueSpec) -> Consumer:
        async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
            got.setdefault(spec.name, []).append(envelope.type)
            return ACK

        return Consumer(spec, handler)

    broker = InMemoryBroker(TOPOLOGY, sleep=time.sleep)
    for spec in (
        TOPOLOGY.orchestrator,
        TOPOLOGY.generator_work,
        TOPOLOGY.generator_control("g1"),
        TOPOLOGY.notifier("n1"),
        TOPOLOGY.notifier("n2"),
    ):
        broker.add_consumer(consumer(spec))
    await broker.start()
    request = job_requested()
    await broker.publish(request, "gateway.JobRequested")
    await broker.publish(generation_requested(), "job.GenerationRequested")
    await broker.publish(request.follow(JobCancelled(reason="x")), "job.JobCancelled")
    await broker.wait_idle()
    assert got == {
        "mem.job-orchestrator": ["JobRequested"],
        "mem.ai-generator.work": ["GenerationRequested"],
        "mem.ai-generator.control.g1": ["JobCancelled"],
        "mem.notifier.n1": ["GenerationRequested", "JobCancelled"],
        "mem.notifier.n2": ["GenerationRequested", "JobCancelled"],
    }
    await broker.stop()
    # Per-process queues go with their process; durable ones stay.
    assert "mem.notifier.n1" not in broker._queues
    assert broker.messages(TOPOLOGY.generator_work.name) == []


async def test_the_work_queue_hands_out_the_highest_priority_first(time: FakeTime) -> None:
    broker = InMemoryBroker(TOPOLOGY, sleep=time.sleep)
    await broker.start()  # the work queue is declared, nobody consumes it yet
    for priority in (1, None, 9, 5, 9):
        await broker.publish(generation_requested(), "job.GenerationRequested", priority=priority)
    order = [m.priority for m in broker.messages(TOPOLOGY.generator_work.name)]
    assert order == [9, 9, 5, 1, 0]  # aio-pika reads no priority as 0

    taken: list[int | None] = []

    async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        taken.append(message.priority)
        return ACK

    broker.add_consumer(Consumer(TOPOLOGY.generator_work, handler, prefetch=1))
    await broker.wait_idle()
    assert taken == [9, 9, 5, 1, 0]
    await broker.stop()


async def test_prefetch_bounds_how_many_handlers_run_at_once(time: FakeTime) -> None:
    release = asyncio.Event()
    two_running = asyncio.Event()
    running = 0
    most = 0

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == 2:
            two_running.set()
        await release.wait()
        running -= 1
        return ACK

    broker = _started_broker(handler, time, prefetch=2)
    await broker.start()
    for _ in range(5):
        await broker.publish(job_requested(), "gateway.JobRequested")
    await asyncio.wait_for(two_running.wait(), 5)
    assert await broker.queue_stats(TOPOLOGY.orchestrator.name) == (3, 1)
    release.set()
    await broker.wait_idle()
    assert most == 2
    await broker.stop()


async def test_stop_lets_handlers_finish_and_puts_back_what_it_cuts_off(time: FakeTime) -> None:
    forever = asyncio.Event()
    quick_done = asyncio.Event()
    handled: list[str] = []

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        if "slow" in str(envelope.data["query"]):
            await forever.wait()
        handled.append(str(envelope.data["query"]))
        if handled == ["quick"]:
            quick_done.set()
        return ACK

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish(job_requested("slow"), "gateway.JobRequested")
    await broker.publish(job_requested("quick"), "gateway.JobRequested")
    await asyncio.wait_for(quick_done.wait(), 5)
    await broker.stop(drain_timeout=0.01)
    [cut_off] = broker.messages(TOPOLOGY.orchestrator.name)
    assert cut_off.redelivered
    # Started again, it consumes what its queue kept.
    forever.set()
    await broker.start()
    await broker.wait_idle()
    assert handled == ["quick", "slow"]
    await broker.stop()


async def test_a_handler_cannot_settle_its_message_itself(time: FakeTime) -> None:
    errors: list[BaseException] = []

    async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        try:
            await message.ack()
        except Exception as exc:
            errors.append(exc)
        return ACK

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish(job_requested(), "gateway.JobRequested")
    await broker.wait_idle()
    assert len(errors) == 1
    await broker.stop()


async def test_waiting_for_idle_gives_up_on_an_endless_outage(time: FakeTime) -> None:
    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        raise ConnectionResetError("still away")

    broker = _started_broker(handler, time)
    await broker.start()
    await broker.publish(job_requested(), "gateway.JobRequested")
    with pytest.raises(TimeoutError, match="still busy"):
        await broker.wait_idle(timeout=0.05)
    await broker.stop(drain_timeout=0)
    assert len(broker.messages(TOPOLOGY.orchestrator.name)) == 1
