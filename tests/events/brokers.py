"""One test body on both brokers: the real Broker on the local RabbitMQ, and the
in-memory one of :mod:`canvas_events.testing`, which must give the same consumer code the
same outcomes. A test asks for the ``brokers`` fixture (tests/events/conftest.py) and
runs once on each."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from canvas_events.broker import ACK, Broker, Consumer, Outcome
from canvas_events.envelope import Envelope
from canvas_events.testing import InMemoryBroker
from canvas_events.topology import QueueSpec, Topology
from tests.events.memory import FakeTime
from tests.support.waiting import eventually

AnyBroker = Broker | InMemoryBroker
# Where the gateway publishes a JobRequested: into the orchestrator's queue.
KEY = "gateway.JobRequested"
Handler = Callable[[Envelope, AbstractIncomingMessage], Awaitable[Outcome]]

# The consumer the broker tests have always used: 3 attempts, 0.05 s apart.
CONSUMER: dict[str, Any] = {"prefetch": 4, "max_attempts": 3, "retry_delay": 0.05}


class Acks:
    """A handler that acks every message and keeps it (envelope and delivery) to read."""

    def __init__(self) -> None:
        self._seen: asyncio.Queue[tuple[Envelope, AbstractIncomingMessage]] = asyncio.Queue()

    async def __call__(self, envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        await self._seen.put((envelope, message))
        return ACK

    async def next(self, timeout: float = 10) -> tuple[Envelope, AbstractIncomingMessage]:
        """The oldest message not read yet (fails the test after ``timeout``)."""
        return await asyncio.wait_for(self._seen.get(), timeout)

    def empty(self) -> bool:
        """Whether every message handled so far was read."""
        return self._seen.empty()


class Brokers(abc.ABC):
    """Makes the broker of one test (:meth:`started`, :meth:`unstarted`), publishes as a
    foreign publisher would, reads dead letters, and stops it afterwards."""

    # The in-memory broker's fake clock (its pauses); None on RabbitMQ, where they are real.
    time: FakeTime | None = None

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._broker: AnyBroker | None = None

    @property
    def broker(self) -> AnyBroker:
        assert self._broker is not None, "no broker made yet"
        return self._broker

    def unstarted(self) -> AnyBroker:
        """A broker with no consumer, not started."""
        self._broker = self._new()
        return self._broker

    async def started(
        self, handler: Handler | None = None, *, queue: QueueSpec | None = None, **consumer: Any
    ) -> AnyBroker:
        """A connected broker; with a ``handler``, consuming ``queue`` (the orchestrator's
        by default) with :data:`CONSUMER`'s options, or ``consumer``'s."""
        broker = self.unstarted()
        if handler is not None:
            spec = queue or self.topology.orchestrator
            broker.add_consumer(Consumer(spec, handler, **{**CONSUMER, **consumer}))
        await broker.start()
        await broker.wait_connected(10)
        return broker

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.stop()

    @abc.abstractmethod
    def _new(self) -> AnyBroker: ...

    @abc.abstractmethod
    async def publish_raw(self, body: bytes, routing_key: str) -> None:
        """Any ``body`` onto the events exchange, as a foreign or broken publisher might."""

    @abc.abstractmethod
    async def dead_letters(self, count: int) -> list[AbstractIncomingMessage]:
        """The orchestrator queue's dead letters once ``count`` have come, oldest first
        (and fails when more have come)."""


class OnRabbitMQ(Brokers):
    """The real Broker, on the test's own exchange and queues of the local RabbitMQ."""

    def __init__(self, url: str, topology: Topology) -> None:
        super().__init__(topology)
        self.url = url
        self._raw: AbstractRobustConnection | None = None

    def _new(self) -> Broker:
        return Broker(self.url, self.topology, connection_name="test")

    async def stop(self) -> None:
        await super().stop()
        if self._raw is not None:
            await self._raw.close()
            self._raw = None

    async def channel(self) -> aio_pika.abc.AbstractChannel:
        """A channel of the test's own, beside the broker's."""
        if self._raw is None:
            self._raw = await aio_pika.connect_robust(self.url)
        return await self._raw.channel()

    async def publish_raw(self, body: bytes, routing_key: str) -> None:
        exchange = await (await self.channel()).get_exchange(self.topology.exchange)
        await exchange.publish(aio_pika.Message(body), routing_key)

    async def dead_letters(self, count: int) -> list[AbstractIncomingMessage]:
        name = self.topology.orchestrator.dead_letter_queue
        queue = await (await self.channel()).declare_queue(name, passive=True)

        async def taken() -> AbstractIncomingMessage | None:
            message = await queue.get(fail=False)
            if message is not None:
                await message.ack()
            return message

        found = [
            await eventually(taken, timeout=10, what=f"a dead letter on {name}", interval=0.02)
            for _ in range(count)
        ]
        # Messages only: a quorum queue counts a basic.get as a consumer for a moment.
        stats = await self.broker.queue_stats(name)
        assert stats is not None
        assert stats[0] == 0, f"more dead letters on {name}: {stats}"
        return found


class InMemory(Brokers):
    """The in-memory broker, on a fake clock: its pauses take no time."""

    time: FakeTime

    def __init__(self, topology: Topology) -> None:
        super().__init__(topology)
        self.time = FakeTime()

    def _new(self) -> InMemoryBroker:
        return InMemoryBroker(self.topology, sleep=self.time.sleep, clock=self.time.clock)

    @property
    def memory(self) -> InMemoryBroker:
        broker = self.broker
        assert isinstance(broker, InMemoryBroker)
        return broker

    def unstarted(self) -> InMemoryBroker:
        super().unstarted()
        return self.memory

    async def started(
        self, handler: Handler | None = None, *, queue: QueueSpec | None = None, **consumer: Any
    ) -> InMemoryBroker:
        await super().started(handler, queue=queue, **consumer)
        return self.memory

    async def publish_raw(self, body: bytes, routing_key: str) -> None:
        await self.memory.publish_raw(body, routing_key)

    async def dead_letters(self, count: int) -> list[AbstractIncomingMessage]:
        await self.memory.wait_idle()
        found = self.memory.dead_letters(self.topology.orchestrator)
        assert len(found) == count, f"{len(found)} dead letters, not {count}"
        return found
