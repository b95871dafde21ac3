"""The in-memory broker alone (``memory``): what tests/events/test_broker.py does not run
on both brokers, with no broker running. More of the consumer code it shares with the
real Broker, and what it models of RabbitMQ (routing, priorities, prefetch, stopping).
Pauses go to a fake clock: these tests take milliseconds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import ACK, ERROR_HEADER, Consumer, DeadLetter, Outcome
from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage
from canvas_events.events import JobCancelled
from canvas_events.testing import topic_matches
from canvas_events.topology import CLASSIC, QUORUM, QueueSpec, QueueType, Topology
from tests.events.brokers import KEY, InMemory
from tests.events.memory import generation_requested, job_requested

# -- more of the same consumer code ------------------------------------------------------


async def test_dead_letter_returned_by_the_handler_is_dead_lettered_at_once(
    memory: InMemory,
) -> None:
    calls = 0

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        nonlocal calls
        calls += 1
        return DeadLetter("this job asks for the impossible")

    broker = await memory.started(handler)
    await broker.publish(job_requested(), KEY)
    [dead] = await memory.dead_letters(1)
    assert calls == 1
    assert dead.headers[ERROR_HEADER] == "this job asks for the impossible"


async def test_a_dead_letter_reason_is_redacted_and_cut_short(memory: InMemory) -> None:
    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        raise PoisonMessage("cannot reach amqp://guest:hunter22@rabbit/ " + "x" * 2000)

    broker = await memory.started(handler)
    await broker.publish(job_requested(), KEY)
    [dead] = await memory.dead_letters(1)
    reason = str(dead.headers[ERROR_HEADER])
    assert "hunter22" not in reason
    assert "amqp://guest:***@rabbit/" in reason
    assert len(reason) == 1000


async def test_an_outage_pause_grows_with_the_outage_up_to_the_limit_and_resets_after(
    memory: InMemory,
) -> None:
    failing = 12

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        nonlocal failing
        if failing:
            failing -= 1
            raise ConnectionResetError("connection reset by peer")
        return ACK

    broker = await memory.started(handler, retry_delay=1.0, max_outage_delay=4.0)
    await broker.publish(job_requested(), KEY)
    await broker.wait_idle()
    pauses = memory.time.pauses  # the same list, growing
    assert len(pauses) == 12
    assert 0.8 <= pauses[0] <= 1.2  # at least retry_delay, with jitter
    assert all(0.8 <= pause <= 4.8 for pause in pauses)
    assert pauses[-1] >= 3.2  # half an outage of 10 s and more: the limit
    # The handler succeeded: the next outage starts from retry_delay again.
    failing = 1
    await broker.publish(job_requested(), KEY)
    await broker.wait_idle()
    assert 0.8 <= pauses[-1] <= 1.2


async def test_handlers_log_with_the_job_and_the_event_type_bound(memory: InMemory) -> None:
    bound: list[dict[str, Any]] = []

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        bound.append(structlog.contextvars.get_contextvars())
        return ACK

    broker = await memory.started(handler)
    sent = job_requested()
    await broker.publish(sent, KEY)
    await broker.wait_idle()
    assert bound == [
        {
            "job_id": str(sent.job_id),
            "correlation_id": sent.correlation_id,
            "event_type": "JobRequested",
        }
    ]


async def test_a_dead_letter_no_queue_takes_keeps_the_message(memory: InMemory) -> None:
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

    broker = await memory.started(handler, queue=spec, prefetch=1)
    await broker.publish(job_requested(), "side.JobRequested")
    await asyncio.wait_for(third_try.wait(), 5)
    await broker.stop(drain_timeout=0)
    [kept] = broker.messages("mem.side")
    assert kept.redelivered
    assert memory.time.pauses[:2] == [0.05, 0.05]  # retry_delay before each try


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
    memory: InMemory,
) -> None:
    got: dict[str, list[str]] = {}

    def consumer(spec: QueueSpec) -> Consumer:
        async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
            got.setdefault(spec.name, []).append(envelope.type)
            return ACK

        return Consumer(spec, handler)

    broker = memory.unstarted()
    topology = memory.topology
    for spec in (
        topology.orchestrator,
        topology.generator_work,
        topology.generator_control("g1"),
        topology.notifier("n1"),
        topology.notifier("n2"),
    ):
        broker.add_consumer(consumer(spec))
    await broker.start()
    request = job_requested()
    await broker.publish(request, KEY)
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
    assert broker.messages(topology.generator_work.name) == []


@pytest.mark.parametrize(
    ("queue_type", "expected"),
    [(CLASSIC, [9, 9, 5, 1, 0]), (QUORUM, [1, 0, 9, 5, 9])],
    ids=["classic: highest priority first", "quorum (RabbitMQ 3): in the order published"],
)
async def test_the_work_queue_hands_out_by_priority_where_classic(
    queue_type: QueueType, expected: list[int]
) -> None:
    memory = InMemory(Topology(prefix="mem", queue_type=queue_type))
    try:
        broker = await memory.started()  # the work queue is declared, nobody consumes it yet
        work = memory.topology.generator_work
        for priority in (1, None, 9, 5, 9):
            await broker.publish(
                generation_requested(), "job.GenerationRequested", priority=priority
            )
        order = [m.priority for m in broker.messages(work.name)]
        assert order == expected  # aio-pika reads no priority as 0

        taken: list[int | None] = []

        async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
            taken.append(message.priority)
            return ACK

        broker.add_consumer(Consumer(work, handler, prefetch=1))
        await broker.wait_idle()
        assert taken == expected
    finally:
        await memory.stop()


async def test_prefetch_bounds_how_many_handlers_run_at_once(memory: InMemory) -> None:
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

    broker = await memory.started(handler, prefetch=2)
    for _ in range(5):
        await broker.publish(job_requested(), KEY)
    await asyncio.wait_for(two_running.wait(), 5)
    assert await broker.queue_stats(memory.topology.orchestrator.name) == (3, 1)
    release.set()
    await broker.wait_idle()
    assert most == 2


async def test_stop_lets_handlers_finish_and_puts_back_what_it_cuts_off(memory: InMemory) -> None:
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

    broker = await memory.started(handler)
    await broker.publish(job_requested("slow"), KEY)
    await broker.publish(job_requested("quick"), KEY)
    await asyncio.wait_for(quick_done.wait(), 5)
    await broker.stop(drain_timeout=0.01)
    [cut_off] = broker.messages(memory.topology.orchestrator.name)
    assert cut_off.redelivered
    # Started again, it consumes what its queue kept.
    forever.set()
    await broker.start()
    await broker.wait_idle()
    assert handled == ["quick", "slow"]


async def test_a_handler_cannot_settle_its_message_itself(memory: InMemory) -> None:
    errors: list[BaseException] = []

    async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        try:
            await message.ack()
        except Exception as exc:
            errors.append(exc)
        return ACK

    broker = await memory.started(handler)
    await broker.publish(job_requested(), KEY)
    await broker.wait_idle()
    assert len(errors) == 1


async def test_waiting_for_idle_gives_up_on_an_endless_outage(memory: InMemory) -> None:
    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        raise ConnectionResetError("still away")

    broker = await memory.started(handler)
    await broker.publish(job_requested(), KEY)
    with pytest.raises(TimeoutError, match="still busy"):
        await broker.wait_idle(timeout=0.05)
    await broker.stop(drain_timeout=0)
    assert len(broker.messages(memory.topology.orchestrator.name)) == 1
