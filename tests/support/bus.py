"""The test's side of the real broker, for tests that run a service in-process: it
publishes as the gateway, the generators or the relay would, and records what the
services publish. One bus for every suite: the orchestrator's tests record ``job.#``
(what its relay publishes), the generator's ``generator.#`` (what generators answer).

It talks to the real RabbitMQ: publishing goes through a :class:`Broker` like the
services' (confirms, ``mandatory``), recording through a queue of its own, exclusive to
the bus. For unit tests without RabbitMQ, see :mod:`canvas_events.testing`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID, uuid4

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from canvas_events import tracing
from canvas_events.broker import Broker, envelopes_of
from canvas_events.envelope import Envelope
from canvas_events.events import Event, GenerationRequested, JobRequested
from canvas_events.topology import BATCH, GATEWAY, GENERATOR, JOB, Topology, routing_key
from tests.support.waiting import eventually

# Who publishes: `publish(envelope, GATEWAY)` routes as the gateway would.
SOURCES = frozenset({GATEWAY, GENERATOR, JOB})
FINAL_RESULTS = frozenset({"GenerationSucceeded", "GenerationFailed"})


@dataclass
class Seen:
    """One message a service published, as the bus received it."""

    routing_key: str
    priority: int | None
    envelope: Envelope
    # The traceparent it carried (its own, or its batch's for it), if any.
    traceparent: str | None = None


class Bus:
    """Publishes like the gateway, the generators and the relay; records every message
    whose routing key matches one of ``listen`` (topic patterns), twice over:
    :attr:`messages` keeps them all in arrival order (:meth:`of`, :meth:`wait_for` read
    it), :attr:`arrivals` queues their envelopes until read (:meth:`next`,
    :meth:`results` take from it)."""

    def __init__(
        self, amqp_url: str, topology: Topology, *, listen: str | Iterable[str] = "job.#"
    ) -> None:
        self._url = amqp_url
        self.topology = topology
        self.listen = (listen,) if isinstance(listen, str) else tuple(listen)
        self.broker = Broker(amqp_url, topology, connection_name=f"test-bus-{uuid4().hex[:6]}")
        self.messages: list[Seen] = []
        self.arrivals: asyncio.Queue[Envelope] = asyncio.Queue()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def start(self) -> None:
        """Connect (the broker declares the whole topology), and start recording."""
        await self.broker.start()
        await self.broker.wait_connected(15)
        self._connection = await aio_pika.connect_robust(self._url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await self._channel.declare_exchange(
            self.topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        for pattern in self.listen:
            await queue.bind(self._exchange, routing_key=pattern)
        await queue.consume(self._on_message, no_ack=True)

    async def stop(self) -> None:
        await self.broker.stop()
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # A batch's events are recorded one by one, each with the key it would have had
        # on its own (``job.Batch`` carries ``job.JobQueued``, ...).
        source = (message.routing_key or "").split(".", 1)[0]
        batch = message.type == BATCH
        for index, envelope in enumerate(envelopes_of(message)):
            key = message.routing_key or ""
            if batch:
                key = routing_key(source, envelope.type)
            traceparent = tracing.parent_in(message.headers, index if batch else None)
            self.messages.append(Seen(key, message.priority, envelope, traceparent))
            self.arrivals.put_nowait(envelope)

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self, envelope: Envelope, to: str = JOB, *, priority: int | None = None
    ) -> None:
        """Publish ``envelope`` and wait for the broker's confirm. ``to`` is who
        publishes it (GATEWAY, GENERATOR, JOB: the relay), routing it as
        ``<source>.<type>``, or else the routing key itself. ``mandatory`` as the
        services publish: all but the relay's events other than GenerationRequested,
        which go to per-process queues that may all be away."""
        key = routing_key(to, envelope.type) if to in SOURCES else to
        relayed = key.startswith(f"{JOB}.")
        mandatory = not relayed or envelope.type == GenerationRequested.type_name()
        await self.broker.publish(envelope, key, priority=priority, mandatory=mandatory)

    async def publish_raw(self, body: bytes, routing_key: str = "job.GenerationRequested") -> None:
        """Any ``body`` onto the events exchange (confirmed, not mandatory), as a
        foreign or broken publisher might send it."""
        assert self._exchange is not None, "the bus is not started"
        await self._exchange.publish(aio_pika.Message(body), routing_key)

    async def request(
        self,
        *,
        user_id: str = "alice",
        canvas_id: str | None = None,
        priority: int = 5,
        query: str = "a login flowchart",
        job_id: UUID | None = None,
    ) -> Envelope:
        """Publish a JobRequested as the gateway does; return its envelope."""
        canvas_id = canvas_id or f"canvas-{uuid4().hex[:8]}"
        envelope = Envelope.wrap(
            JobRequested(query=query, canvas_id=canvas_id, priority=priority),
            correlation_id=f"req-{uuid4().hex[:8]}",
            job_id=job_id or uuid4(),
            user_id=user_id,
            canvas_id=canvas_id,
        )
        await self.publish(envelope, GATEWAY)
        return envelope

    async def reply(self, requested: Envelope, event: Event) -> Envelope:
        """Publish ``event`` as a generator answering ``requested``."""
        envelope = requested.follow(event)
        await self.publish(envelope, GENERATOR)
        return envelope

    # -- reading ---------------------------------------------------------------------

    def of(self, job_id: UUID, event_type: str | None = None) -> list[Seen]:
        """Every recorded message of the job (of that type, when given)."""
        return [
            seen
            for seen in self.messages
            if seen.envelope.job_id == job_id
            and (event_type is None or seen.envelope.type == event_type)
        ]

    async def wait_for(self, job_id: UUID, event_type: str, count: int = 1) -> list[Seen]:
        """The first ``count`` recorded messages of that type for the job."""

        async def check() -> list[Seen] | None:
            found = self.of(job_id, event_type)
            return found[:count] if len(found) >= count else None

        return await eventually(check, what=f"{count} x {event_type} of {job_id}")

    async def next(self, timeout: float = 20.0) -> Envelope:
        """The next envelope not read yet (fails the test after ``timeout``)."""
        return await asyncio.wait_for(self.arrivals.get(), timeout)

    async def results(
        self, *requests: Envelope, timeout: float = 20.0
    ) -> dict[str, list[Envelope]]:
        """Every envelope read until each of ``requests`` has a final result
        (GenerationSucceeded or GenerationFailed), by job_id."""
        wanted = [str(r.job_id) for r in requests]
        by_job: dict[str, list[Envelope]] = {job_id: [] for job_id in wanted}

        async def gather() -> None:
            # Only the jobs asked about must end: another job's envelopes are kept, but a
            # job that never sends a result (cancelled) must not hold the wait.
            while not all(any(e.type in FINAL_RESULTS for e in by_job[j]) for j in wanted):
                envelope = await self.arrivals.get()
                by_job.setdefault(str(envelope.job_id), []).append(envelope)

        await asyncio.wait_for(gather(), timeout)
        return by_job

    async def queue_depth(self, name: str) -> int:
        """Messages ready in queue ``name`` (fails when it does not exist)."""
        stats = await self.broker.queue_stats(name)
        assert stats is not None, f"queue {name} does not exist (or the broker is away)"
        return stats[0]
