"""The same consumer on the real Broker (RabbitMQ) and on the in-memory one: the same
deliveries reach the handler, and the same dead letters come out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import (
    ACK,
    ATTEMPTS_HEADER,
    DEAD_LETTERED_AT_HEADER,
    Broker,
    Consumer,
    Outcome,
    Retry,
)
from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage
from canvas_events.testing import InMemoryBroker
from canvas_events.topology import Topology
from tests.events.memory import job_requested

KEY = "gateway.JobRequested"
# (routing key, x-canvas-attempts, redelivered) of each delivery the handler got
Delivery = tuple[str, Any, bool]


@dataclass(frozen=True)
class Scenario:
    """What the handler does on its nth call (from 1), what is published (an envelope or
    a raw body), and how many calls and dead letters make it finished."""

    behaviour: Callable[[int], Outcome]
    body: bytes | None = None
    calls: int = 1
    dead_letters: int = 0


def _fail(exc: BaseException) -> Callable[[int], Outcome]:
    def behaviour(_: int) -> Outcome:
        raise exc

    return behaviour


def _outage_twice(call: int) -> Outcome:
    if call <= 2:
        raise ConnectionResetError("connection reset by peer")
    return ACK


def _retry_twice(call: int) -> Outcome:
    return Retry("not yet", delay=0.01) if call <= 2 else ACK


_unknown = job_requested().model_copy(update={"type": "JobExploded"}).to_json()

SCENARIOS = {
    "acked": Scenario(lambda _: ACK),
    "keeps failing": Scenario(_fail(RuntimeError("bug in handler")), calls=3, dead_letters=1),
    "retried then acked": Scenario(_retry_twice, calls=3),
    "poison raised": Scenario(_fail(PoisonMessage("no such canvas")), dead_letters=1),
    "outage then acked": Scenario(_outage_twice, calls=3),
    "not JSON": Scenario(lambda _: ACK, body=b"{not json", calls=0, dead_letters=1),
    "unknown type": Scenario(lambda _: ACK, body=_unknown, calls=0, dead_letters=1),
}


@dataclass
class Run:
    deliveries: list[Delivery] = field(default_factory=list)
    dead_letters: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def consumer(self, topology: Topology, scenario: Scenario) -> Consumer:
        async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
            headers = message.headers or {}
            attempts = headers.get(ATTEMPTS_HEADER)
            self.deliveries.append((message.routing_key or "", attempts, bool(message.redelivered)))
            if len(self.deliveries) == scenario.calls and not scenario.dead_letters:
                self.finished.set()
            return scenario.behaviour(len(self.deliveries))

        return Consumer(topology.orchestrator, handler, max_attempts=3, retry_delay=0.02)

    def dead(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        assert headers.pop(DEAD_LETTERED_AT_HEADER)
        self.dead_letters.append((message.body, headers))


async def _publish_raw(url: str, topology: Topology, body: bytes) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        exchange = await (await connection.channel()).get_exchange(topology.exchange)
        await exchange.publish(aio_pika.Message(body), KEY)


async def _on_rabbitmq(url: str, topology: Topology, scenario: Scenario, sent: Envelope) -> Run:
    run = Run()
    broker = Broker(url, topology, connection_name="parity")
    broker.add_consumer(run.consumer(topology, scenario))
    await broker.start()
    try:
        await broker.wait_connected(10)
        if scenario.body is None:
            await broker.publish(sent, KEY)
        else:
            await _publish_raw(url, topology, scenario.body)
        if not scenario.dead_letters:
            await asyncio.wait_for(run.finished.wait(), 10)
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            dlq = await channel.declare_queue(topology.orchestrator.dead_letter_queue, passive=True)
            for _ in range(scenario.dead_letters):
                run.dead(await _get(dlq))
    finally:
        await broker.stop()
    return run


async def _get(queue: aio_pika.abc.AbstractQueue) -> AbstractIncomingMessage:
    for _ in range(500):
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
            return message
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing arrived on {queue.name}")


async def _in_memory(topology: Topology, scenario: Scenario, sent: Envelope) -> Run:
    run = Run()
    broker = InMemoryBroker(topology)
    broker.add_consumer(run.consumer(topology, scenario))
    await broker.start()
    if scenario.body is None:
        await broker.publish(sent, KEY)
    else:
        await broker.publish_raw(scenario.body, KEY)
    await broker.wait_idle()
    for message in broker.dead_letters(topology.orchestrator):
        run.dead(message)
    await broker.stop()
    return run


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_the_in_memory_broker_has_the_outcomes_of_the_real_one(
    amqp_url: str, topology: Topology, name: str
) -> None:
    scenario = SCENARIOS[name]
    sent = job_requested()
    real = await _on_rabbitmq(amqp_url, topology, scenario, sent)
    fake = await _in_memory(topology, scenario, sent)
    assert len(real.deliveries) == scenario.calls
    assert len(real.dead_letters) == scenario.dead_letters
    assert fake.deliveries == real.deliveries
    assert fake.dead_letters == real.dead_letters
