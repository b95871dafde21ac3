"""AMQP_QUEUE_TYPE on the real RabbitMQ: the queues every process shares are quorum
queues on a fresh topology (classic where the setting says so), dead letters still reach
their ``.dlq``, and a queue that already exists with the other type is kept, works, and
is warned about once."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess

import aio_pika
import pytest
import structlog

from canvas_events.broker import ERROR_HEADER, Broker, Consumer, DeadLetter, Outcome
from canvas_events.envelope import Envelope
from canvas_events.topology import CLASSIC, QUORUM, Topology, dead_letter_queue_arguments
from tests.events.brokers import KEY, Acks, OnRabbitMQ
from tests.events.memory import job_requested
from tests.support.waiting import eventually


def queue_types(topology: Topology) -> dict[str, str]:
    """Name → type of the topology's queues, as the broker lists them (``rabbitmqctl``
    beside the broker: without it these tests fail, never skip, as every test of a
    missing service does)."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail(
            "rabbitmqctl is not installed: these tests read queue types with it "
            "(Debian's rabbitmq-server package brings it)",
            pytrace=False,
        )
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "type"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = (line.split("\t") for line in listed.splitlines() if "\t" in line)
    return {name: kind for name, kind in rows if name.startswith(f"{topology.prefix}.")}


def shared_queues(topology: Topology) -> set[str]:
    return {spec.name for spec in topology.durable_queues} | set(topology.dead_letter_queues)


async def test_a_fresh_topology_gets_quorum_queues_and_quorum_dead_letter_queues(
    rabbitmq: OnRabbitMQ,
) -> None:
    await rabbitmq.started(Acks())
    types = queue_types(rabbitmq.topology)
    assert {name: types.get(name) for name in shared_queues(rabbitmq.topology)} == dict.fromkeys(
        shared_queues(rabbitmq.topology), QUORUM
    )


async def test_amqp_queue_type_classic_declares_classic_queues(
    amqp_url: str, topology: Topology
) -> None:
    classic = OnRabbitMQ(amqp_url, dataclasses.replace(topology, queue_type=CLASSIC))
    try:
        await classic.started(Acks())
        types = queue_types(topology)
        assert {types.get(name) for name in shared_queues(topology)} == {CLASSIC}
    finally:
        await classic.stop()


class Rejects:
    """Dead-letters every message with a reason of its own."""

    async def __call__(self, envelope: Envelope, message: object) -> Outcome:
        return DeadLetter(f"no thanks: {envelope.event_id}")


async def test_a_poison_message_reaches_the_quorum_dlq_with_its_reason(
    rabbitmq: OnRabbitMQ,
) -> None:
    broker = await rabbitmq.started(Rejects())
    sent = job_requested()
    await broker.publish(sent, KEY)
    [dead] = await rabbitmq.dead_letters(1)
    assert dead.message_id == str(sent.event_id)
    assert dead.headers[ERROR_HEADER] == f"no thanks: {sent.event_id}"
    assert queue_types(rabbitmq.topology)[rabbitmq.topology.orchestrator.dead_letter_queue] == (
        QUORUM
    )


async def test_a_message_the_broker_dead_letters_from_a_quorum_queue_reaches_the_dlq(
    rabbitmq: OnRabbitMQ,
) -> None:
    # A reject without requeue (and RabbitMQ 4's delivery limit) dead-letters on the
    # broker's side: at-least-once, through the queue's x-dead-letter-* arguments.
    await rabbitmq.started()  # the topology declared, nobody consuming
    await rabbitmq.publish_raw(b"raw", KEY)
    channel = await rabbitmq.channel()
    queue = await channel.declare_queue(rabbitmq.topology.orchestrator.name, passive=True)

    async def taken() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await queue.get(fail=False)

    message = await eventually(taken, what="the message in the queue")
    await message.reject(requeue=False)
    [dead] = await rabbitmq.dead_letters(1)
    assert dead.body == b"raw"
    deaths = dead.headers["x-death"]
    assert isinstance(deaths, list)
    assert [death["reason"] for death in deaths if isinstance(death, dict)] == ["rejected"]


async def test_an_existing_classic_queue_is_kept_works_and_is_warned_about_once(
    amqp_url: str, topology: Topology
) -> None:
    # As a deployment from before AMQP_QUEUE_TYPE declared them.
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for spec in topology.durable_queues:
            await channel.declare_queue(
                spec.name,
                durable=True,
                arguments=spec.declare_arguments(topology.dead_letter_exchange, CLASSIC),
            )
        for name in topology.dead_letter_queues:
            await channel.declare_queue(
                name, durable=True, arguments=dead_letter_queue_arguments(CLASSIC)
            )
    assert topology.queue_type == QUORUM
    seen = Acks()
    # Declaring the topology again every 0.2 s: no second warning, no reconnect.
    broker = Broker(amqp_url, topology, connection_name="test", topology_interval=0.2)
    broker.add_consumer(Consumer(topology.orchestrator, seen))
    with structlog.testing.capture_logs() as logs:
        await broker.start()
        try:
            await broker.wait_connected(10)
            await asyncio.sleep(1.0)
            sent = job_requested()
            await broker.publish(sent, KEY)
            assert (await seen.next())[0].event_id == sent.event_id
            assert broker.connect_count == 1
        finally:
            await broker.stop()
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert sorted(entry["queue"] for entry in warnings) == sorted(shared_queues(topology))
    assert {entry["queue_type"] for entry in warnings} == {CLASSIC}
    assert all("delete_queue" in entry["how_to_move"] for entry in warnings)
    types = queue_types(topology)
    assert {types.get(name) for name in shared_queues(topology)} == {CLASSIC}


async def test_an_existing_queue_refused_for_another_reason_is_still_an_error(
    amqp_url: str, topology: Topology
) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            topology.orchestrator.name, durable=True, arguments={"x-max-length": 7}
        )
    broker = Broker(amqp_url, topology, connection_name="test")
    await broker.start()
    try:
        # (Waited for, not slept on: on a loaded machine the first declare can take
        # longer than a second.)
        await eventually(
            lambda: "PRECONDITION_FAILED" in (broker.last_error or "") or None,
            timeout=20,
            what="the broker's refusal",
        )
        assert not broker.connected
    finally:
        await broker.stop()


async def test_a_kept_classic_queue_deleted_after_draining_comes_back_as_quorum(
    amqp_url: str, topology: Topology
) -> None:
    # The way docs/events.md gives to move a queue: drain it, delete it, and the running
    # services declare it again with AMQP_QUEUE_TYPE.
    queue = topology.orchestrator
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            queue.name,
            durable=True,
            arguments=queue.declare_arguments(topology.dead_letter_exchange, CLASSIC),
        )
        seen = Acks()
        broker = Broker(amqp_url, topology, connection_name="test", topology_interval=0.2)
        broker.add_consumer(Consumer(queue, seen))
        await broker.start()
        try:
            await broker.wait_connected(10)
            assert queue_types(topology)[queue.name] == CLASSIC
            await channel.queue_delete(queue.name)

            def quorum_again() -> bool:
                return queue_types(topology).get(queue.name) == QUORUM

            await eventually(quorum_again, timeout=20, what="the queue declared again as quorum")
            await broker.wait_connected(10)
            sent = job_requested()
            await broker.publish(sent, KEY)
            assert (await seen.next())[0].event_id == sent.event_id
        finally:
            await broker.stop()
