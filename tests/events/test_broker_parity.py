"""The same consumer on the real Broker (RabbitMQ) and on the in-memory one: the same
deliveries reach the handler, and the same dead letters come out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import (
    ACK,
    ATTEMPTS_HEADER,
    DEAD_LETTERED_AT_HEADER,
    DELIVERY_COUNT_HEADER,
    Outcome,
    Retry,
)
from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage
from tests.events.brokers import KEY, Brokers, Handler, InMemory, OnRabbitMQ
from tests.events.memory import job_requested

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

    def handler(self, scenario: Scenario) -> Handler:
        async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
            headers = message.headers or {}
            attempts = headers.get(ATTEMPTS_HEADER)
            self.deliveries.append((message.routing_key or "", attempts, bool(message.redelivered)))
            if len(self.deliveries) == scenario.calls and not scenario.dead_letters:
                self.finished.set()
            return scenario.behaviour(len(self.deliveries))

        return handler

    def dead(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        assert headers.pop(DEAD_LETTERED_AT_HEADER)
        # Set by a quorum queue on each delivery (here the .dlq's); not modelled in memory.
        headers.pop(DELIVERY_COUNT_HEADER, None)
        self.dead_letters.append((message.body, headers))


async def _run(brokers: Brokers, scenario: Scenario, sent: Envelope) -> Run:
    run = Run()
    broker = await brokers.started(run.handler(scenario), retry_delay=0.02)
    if scenario.body is None:
        await broker.publish(sent, KEY)
    else:
        await brokers.publish_raw(scenario.body, KEY)
    if not scenario.dead_letters:
        await asyncio.wait_for(run.finished.wait(), 10)
    for message in await brokers.dead_letters(scenario.dead_letters):
        run.dead(message)
    await brokers.stop()
    return run


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_the_in_memory_broker_has_the_outcomes_of_the_real_one(
    rabbitmq: OnRabbitMQ, name: str
) -> None:
    scenario = SCENARIOS[name]
    sent = job_requested()
    real = await _run(rabbitmq, scenario, sent)
    # The same names: queue names stand in routing keys and dead letters' headers.
    fake = await _run(InMemory(rabbitmq.topology), scenario, sent)
    assert len(real.deliveries) == scenario.calls
    assert len(real.dead_letters) == scenario.dead_letters
    assert fake.deliveries == real.deliveries
    assert fake.dead_letters == real.dead_letters
