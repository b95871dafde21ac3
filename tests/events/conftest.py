"""The brokers of the events tests: ``brokers`` runs a test once on the real RabbitMQ and
once in memory; ``rabbitmq`` and ``memory`` give one of them, for what the other has no
twin of (reconnects; routing, priorities, a fake clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from canvas_events.topology import Topology
from tests.events.brokers import Brokers, InMemory, OnRabbitMQ


@pytest.fixture
async def rabbitmq(amqp_url: str, topology: Topology) -> AsyncIterator[OnRabbitMQ]:
    """The real Broker, on the test's own topology of the local RabbitMQ; stopped after."""
    made = OnRabbitMQ(amqp_url, topology)
    yield made
    await made.stop()


@pytest.fixture
async def memory() -> AsyncIterator[InMemory]:
    """The in-memory broker, on a fake clock; stopped after the test."""
    made = InMemory(Topology(prefix="mem"))
    yield made
    await made.stop()


@pytest.fixture(params=["rabbitmq", "memory"])
def brokers(request: pytest.FixtureRequest) -> Brokers:
    """Each of the two, in turn: the test runs once on each."""
    made: Brokers = request.getfixturevalue(request.param)
    return made
