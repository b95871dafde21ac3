"""An in-memory broker for unit tests: :class:`canvas_events.broker.Broker`'s consumers,
outcomes and publishing, without RabbitMQ.

It runs the same consumer code: every delivered message goes through
:class:`~canvas_events.broker.Deliveries`, as on the real Broker, and only the verdict is
carried out here, in memory, the way the Broker carries it out on RabbitMQ:

- :data:`~canvas_events.broker.ACK`: the message is gone.
- a dead letter: a copy with the reason and its origin in the ``x-canvas-*`` headers goes
  to the consumer's dead-letter queue (read it with :meth:`InMemoryBroker.dead_letters`);
  when no dead-letter queue of that name is declared, the message is put back after
  ``retry_delay``, as the Broker does when the dead-letter exchange routes it nowhere.
- requeue (an outage): after the pause, back to its place in the queue, redelivered.
- redeliver (a retry): after the pause, a copy carrying ``x-canvas-attempts`` goes to the
  back of the queue through the default exchange, and the original is gone.

What it models of RabbitMQ: the topic exchange (each queue's bindings, ``*`` one word,
``#`` zero or more), the direct dead-letter exchange into the topology's dead-letter
queues, the default exchange; the durable queues and dead-letter queues declared at
:meth:`~InMemoryBroker.start` as every service declares them, each consumer's queue with
them, and its per-process queues gone at :meth:`~InMemoryBroker.stop`; ``prefetch``; a
handler per message in a task of its own; priorities on queues with ``x-max-priority``;
a ``mandatory`` publish that no queue takes raising :class:`PublishError`. Not modelled:
connections and reconnects, confirm timing, queues deleted under a consumer, ``x-death``.

Pauses (retry delays, outages) are real ``asyncio.sleep`` unless ``sleep`` is given; a
test may pass one that only records them, and a ``clock`` to go with it.

:func:`recorded_spans` turns traces on for a block, into the SDK's in-memory exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pamqp.header import ContentHeader

from canvas_events import tracing
from canvas_events.broker import (
    Ack,
    BrokerBase,
    Consumer,
    Deliveries,
    Part,
    Redeliver,
    Requeue,
    Split,
    Verdict,
    batch_items,
    dead_letter_headers,
    envelope_properties,
    redeliver_headers,
)
from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage, PublishError
from canvas_events.topology import BATCH, QueueSpec, Topology

__all__ = ["InMemoryBroker", "Published", "delivered_message", "recorded_spans", "topic_matches"]

log = structlog.get_logger("canvas_events.testing")

Sleep = Callable[[float], Awaitable[None]]


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic exchange routes ``routing_key`` through a binding ``pattern``:
    both split on dots, ``*`` stands for exactly one word, ``#`` for zero or more."""
    return _matches(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _matches(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_matches(rest, words[skip:]) for skip in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _matches(rest, words[1:])


@dataclass(frozen=True)
class Published:
    """One envelope :meth:`InMemoryBroker.publish` took."""

    routing_key: str
    envelope: Envelope
    priority: int | None
    mandatory: bool


@dataclass(frozen=True)
class _Message:
    """A message in a queue: what a consumer gets, and its place (``seq``)."""

    body: bytes
    properties: aiormq.spec.Basic.Properties
    exchange: str
    routing_key: str
    seq: int
    redelivered: bool = False


@dataclass(eq=False)
class _Subscription:
    consumer: Consumer
    tag: str
    in_flight: int = 0

    @property
    def has_room(self) -> bool:
        # As in AMQP, a prefetch of 0 means no limit.
        return self.consumer.prefetch <= 0 or self.in_flight < self.consumer.prefetch


@dataclass(eq=False)
class _Delivery:
    """A message handed to a consumer, unsettled until its verdict is carried out."""

    queue: _Queue
    subscription: _Subscription
    message: _Message
    settled: bool = False


@dataclass(eq=False)
class _Queue:
    name: str
    bindings: tuple[str, ...] = ()
    max_priority: int | None = None
    durable: bool = True
    subscriptions: list[_Subscription] = field(default_factory=list)
    _ready: list[tuple[int, int, _Message]] = field(default_factory=list)
    _turn: int = 0

    @classmethod
    def of(cls, spec: QueueSpec) -> _Queue:
        # As declared on RabbitMQ: a priority queue only where the spec's type is classic.
        max_priority = spec.declare_arguments("").get("x-max-priority")
        return cls(
            spec.name,
            spec.bindings,
            max_priority if isinstance(max_priority, int) else None,
            spec.durable and not spec.exclusive and not spec.auto_delete,
        )

    def takes(self, routing_key: str) -> bool:
        return any(topic_matches(pattern, routing_key) for pattern in self.bindings)

    def put(self, message: _Message) -> None:
        """Into its place: by priority (on a priority queue), then by ``seq``."""
        priority = 0
        if self.max_priority is not None:
            priority = min(message.properties.priority or 0, self.max_priority)
        heapq.heappush(self._ready, (-priority, message.seq, message))

    def take(self) -> _Message:
        return heapq.heappop(self._ready)[2]

    def ready(self) -> list[_Message]:
        return [message for *_, message in sorted(self._ready)]

    def __len__(self) -> int:
        return len(self._ready)

    def next_subscription(self) -> _Subscription | None:
        """The next consumer with room for a message, in turn (round robin)."""
        count = len(self.subscriptions)
        for offset in range(count):
            subscription = self.subscriptions[(self._turn + offset) % count]
            if subscription.has_room:
                self._turn = (self._turn + offset + 1) % count
                return subscription
        return None


def _envelopes(body: bytes, properties: aiormq.spec.Basic.Properties) -> list[Envelope]:
    """The valid envelopes a message published by a service carries."""
    if properties.message_type != BATCH:
        return [Envelope.from_json(body)]
    envelopes = []
    for item in batch_items(body):
        with contextlib.suppress(PoisonMessage):
            envelopes.append(Envelope.from_parsed(item))
    return envelopes


class InMemoryBroker(BrokerBase):
    """What :class:`canvas_events.broker.Broker` does for a service, in memory.

    Same lifecycle (``add_consumer``, ``start``, ``wait_connected``, ``connected``,
    ``stop``), ``publish`` and ``queue_stats``; for tests, :meth:`publish_raw` (any body),
    :meth:`messages` and :meth:`dead_letters` (what a queue holds), :attr:`published`
    (every envelope published) and :meth:`wait_idle` (until every message met its fate).
    """

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        sleep: Sleep | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topology = topology or Topology()
        self._sleep: Sleep = sleep or asyncio.sleep
        self._deliveries = Deliveries(clock)
        self._consumers: list[Consumer] = []
        self._subscriptions: list[tuple[_Queue, _Subscription]] = []
        self._queues: dict[str, _Queue] = {}
        # The dead-letter exchange: routing key (a dead-letter queue's name) -> queue.
        self._dead_letter_routes: dict[str, _Queue] = {}
        self._tasks: dict[asyncio.Task[None], _Delivery] = {}
        self._failures: list[BaseException] = []
        self._seq = itertools.count(1)
        self._delivery_tags = itertools.count(1)
        self._consumer_tags = itertools.count(1)
        self.published: list[Published] = []
        super().__init__()

    # -- lifecycle -------------------------------------------------------------------

    def add_consumer(self, consumer: Consumer) -> None:
        """Consume ``consumer.queue`` from ``start()`` on (at once when started)."""
        self._consumers.append(consumer)
        if self.connected:
            self._subscribe(consumer)

    async def start(self) -> None:
        """Declare the topology and every consumer's queue, and start consuming."""
        if self.connected:
            return
        for name in self.topology.dead_letter_queues:
            self._dead_letter_routes[name] = self._declare(QueueSpec(name, (), name))
        for spec in self.topology.durable_queues:
            self._declare(spec)
        for consumer in self._consumers:
            self._subscribe(consumer)
        self._up()

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop consuming, let handlers in flight finish (up to ``drain_timeout``; the
        rest are cancelled and their messages go back, redelivered, as when a
        connection closes), and drop the per-process queues with what they hold."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for queue, subscription in subscriptions:
            queue.subscriptions.remove(subscription)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._queues = {name: q for name, q in self._queues.items() if q.durable}
        self._connected.clear()
        self.last_error = "stopped"

    def _declare(self, spec: QueueSpec) -> _Queue:
        queue = self._queues.get(spec.name)
        if queue is None:
            queue = self._queues[spec.name] = _Queue.of(spec)
        return queue

    def _subscribe(self, consumer: Consumer) -> None:
        queue = self._declare(consumer.queue)
        subscription = _Subscription(consumer, f"in-memory.ctag-{next(self._consumer_tags)}")
        queue.subscriptions.append(subscription)
        self._subscriptions.append((queue, subscription))
        self._dispatch(queue)

    # -- publishing ------------------------------------------------------------------

    async def _publish(
        self,
        body: bytes,
        routing_key: str,
        properties: aiormq.spec.Basic.Properties,
        mandatory: bool,
        timeout: float | None,
    ) -> None:
        """Onto the events exchange (``timeout`` unused: nothing here waits for a
        confirm); :class:`PublishError` when not started, or when the message is
        ``mandatory`` and no queue takes it. Each valid envelope it carries is recorded
        in :attr:`published`."""
        self._route(body, routing_key, properties, mandatory=mandatory)
        for envelope in _envelopes(body, properties):
            self.published.append(Published(routing_key, envelope, properties.priority, mandatory))

    async def publish_raw(
        self,
        body: bytes,
        routing_key: str,
        *,
        headers: dict[str, Any] | None = None,
        priority: int | None = None,
        mandatory: bool = False,
    ) -> None:
        """Any ``body`` onto the events exchange, as a foreign publisher might send it
        (not recorded in :attr:`published`)."""
        properties = aiormq.spec.Basic.Properties(headers=headers, priority=priority)
        self._route(body, routing_key, properties, mandatory=mandatory)

    def _route(
        self,
        body: bytes,
        routing_key: str,
        properties: aiormq.spec.Basic.Properties,
        *,
        mandatory: bool,
    ) -> None:
        if not self.connected:
            raise PublishError(f"broker not connected ({self.last_error})")
        targets = [queue for queue in self._queues.values() if queue.takes(routing_key)]
        if not targets and mandatory:
            raise PublishError(f"no queue took the message ({routing_key})")
        for queue in targets:
            message = _Message(body, properties, self.topology.exchange, routing_key, 0)
            self._enqueue(queue, message)

    def _enqueue(self, queue: _Queue, message: _Message) -> None:
        """``message`` to the back of ``queue`` (a new place), then deliver what can be."""
        queue.put(replace(message, seq=next(self._seq)))
        self._dispatch(queue)

    def _put_back(self, queue: _Queue, message: _Message) -> None:
        """``message`` back to its place in ``queue``, flagged redelivered."""
        queue.put(replace(message, redelivered=True))
        self._dispatch(queue)

    # -- consuming -------------------------------------------------------------------

    def _dispatch(self, queue: _Queue) -> None:
        """Hand ready messages to consumers with room, each in a task of its own."""
        while len(queue):
            subscription = queue.next_subscription()
            if subscription is None:
                return
            delivery = _Delivery(queue, subscription, queue.take())
            subscription.in_flight += 1
            task = asyncio.get_running_loop().create_task(
                self._deliver(delivery), name="in-memory-delivery"
            )
            self._tasks[task] = delivery
            task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        delivery = self._tasks.pop(task)
        delivery.subscription.in_flight -= 1
        if task.cancelled():
            if not delivery.settled:
                # Stopped mid-way (perhaps before it began): the message goes back, as
                # an unacked one does when its channel closes.
                self._put_back(delivery.queue, delivery.message)
        elif (error := task.exception()) is not None:
            # A fault of this broker, not of the handler (Deliveries takes those): the
            # message stays unsettled, and wait_idle() raises it.
            log.error("in-memory delivery failed", error=repr(error))
            self._failures.append(error)
        self._dispatch(delivery.queue)

    async def _deliver(self, delivery: _Delivery) -> None:
        tag = delivery.subscription.tag
        incoming = _incoming(delivery.message, tag, next(self._delivery_tags))
        consumer = delivery.subscription.consumer
        verdict = await self._deliveries.handle(consumer, incoming)
        await self._carry_out(delivery, incoming, verdict)

    async def _carry_out(
        self, delivery: _Delivery, incoming: AbstractIncomingMessage, verdict: Verdict
    ) -> None:
        """What the Broker does with a verdict on RabbitMQ, done in memory. A delivery is
        settled only after its last pause: one cancelled during a pause goes back."""
        queue, message = delivery.queue, delivery.message
        consumer = delivery.subscription.consumer
        if isinstance(verdict, Ack):
            delivery.settled = True
            return
        if isinstance(verdict, Requeue):
            await self._sleep(verdict.delay)
            delivery.settled = True
            self._put_back(queue, message)
            return
        parts = verdict.parts if isinstance(verdict, Split) else (Part(message.body, verdict),)
        if delays := [part.verdict.delay for part in parts if isinstance(part.verdict, Redeliver)]:
            await self._sleep(max(delays))
        for part in parts:
            if isinstance(part.verdict, Redeliver):
                # Back onto the same queue through the default exchange, with the count.
                copy = _copy(message, incoming, part, redeliver_headers(incoming, part.verdict))
                self._enqueue(queue, replace(copy, exchange="", routing_key=queue.name))
                continue
            target = self._dead_letter_routes.get(consumer.queue.dead_letter_queue)
            if target is None:
                # No dead-letter queue takes it: keep the message and try again later.
                await self._sleep(consumer.retry_delay)
                delivery.settled = True
                self._put_back(queue, message)
                return
            headers = dead_letter_headers(consumer, incoming, part.verdict)
            copy = replace(
                _copy(message, incoming, part, headers),
                exchange=self.topology.dead_letter_exchange,
                routing_key=target.name,
            )
            self._enqueue(target, copy)
        delivery.settled = True

    # -- reading ---------------------------------------------------------------------

    async def queue_stats(self, queue_name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or None when it does not exist or
        the broker is not started (as :meth:`Broker.queue_stats`)."""
        queue = self._queues.get(queue_name)
        if queue is None or not self.connected:
            return None
        return len(queue), len(queue.subscriptions)

    def messages(self, queue_name: str) -> list[AbstractIncomingMessage]:
        """What queue ``queue_name`` holds ready, in the order a consumer would get it
        (left in the queue). Raises KeyError for a queue that does not exist."""
        try:
            queue = self._queues[queue_name]
        except KeyError:
            raise KeyError(f"no queue named {queue_name!r}") from None
        return [_incoming(message, "", 0) for message in queue.ready()]

    def dead_letters(self, queue: QueueSpec | str) -> list[AbstractIncomingMessage]:
        """The dead letters of a consumed queue (given by its spec), or what a
        dead-letter queue (given by name) holds; ``x-canvas-error`` says why."""
        return self.messages(queue.dead_letter_queue if isinstance(queue, QueueSpec) else queue)

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no message is in flight and no consumed queue holds one: every
        message published so far met its verdict. Raises TimeoutError after
        ``timeout`` (a handler meeting an endless outage never lets it be idle)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks or any(q.subscriptions and len(q) for q in self._queues.values()):
            if self._failures:
                break
            if loop.time() > deadline:
                raise TimeoutError(f"the in-memory broker is still busy after {timeout:g}s")
            await asyncio.sleep(0.001)
        if self._failures:
            raise self._failures[0]


def delivered_message(
    body: Envelope | bytes,
    routing_key: str = "",
    *,
    headers: dict[str, Any] | None = None,
    priority: int | None = None,
    redelivered: bool = False,
) -> AbstractIncomingMessage:
    """A message as a consumer gets it, to call a handler (or
    :class:`~canvas_events.broker.Deliveries`) with directly: an envelope gets the
    properties :meth:`InMemoryBroker.publish` gives it, bytes none but ``headers``."""
    if isinstance(body, Envelope):
        properties = envelope_properties(body, priority)
        properties.headers = headers
        body = body.to_json()
    else:
        properties = aiormq.spec.Basic.Properties(headers=headers, priority=priority)
    message = _Message(body, properties, "", routing_key, 0, redelivered)
    return _incoming(message, "in-memory.ctag-test", 1)


def _copy(
    message: _Message, incoming: AbstractIncomingMessage, part: Part, headers: dict[str, Any]
) -> _Message:
    """A persistent copy of ``message`` (of one event of it, for a batch's part) with
    ``headers`` added, as the Broker's copies."""
    properties = message.properties
    message_id, correlation_id, type_ = part.ids(incoming)
    copied = aiormq.spec.Basic.Properties(
        content_type=properties.content_type,
        delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT),
        headers=part.headers(incoming, headers),
        message_id=message_id,
        correlation_id=correlation_id,
        message_type=type_,
        priority=properties.priority,
        timestamp=properties.timestamp or datetime.now(UTC),
    )
    return replace(message, body=part.body, properties=copied, redelivered=False)


def _incoming(message: _Message, consumer_tag: str, delivery_tag: int) -> AbstractIncomingMessage:
    """``message`` as aio-pika hands it to a handler. Settled by the broker, never through
    a channel: it is a ``no_ack`` message, which refuses a handler's ack, nack or reject."""
    delivery = aiormq.spec.Basic.Deliver(
        consumer_tag=consumer_tag,
        delivery_tag=delivery_tag,
        redelivered=message.redelivered,
        exchange=message.exchange,
        routing_key=message.routing_key,
    )
    delivered = aiormq.abc.DeliveredMessage(
        delivery=delivery,
        header=ContentHeader(body_size=len(message.body), properties=message.properties),
        body=message.body,
        channel=cast(aiormq.abc.AbstractChannel, None),
    )
    return aio_pika.IncomingMessage(delivered, no_ack=True)


@contextlib.contextmanager
def recorded_spans(service: str = "test") -> Iterator[InMemorySpanExporter]:
    """Traces on for the block, as OTEL_* turns them on in a service, each span kept in
    the exporter yielded as soon as it ends (``get_finished_spans()``); off again after.
    The process's global tracer provider is left alone."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    before = tracing.use(provider.get_tracer(tracing.SCOPE))
    try:
        yield exporter
    finally:
        tracing.use(before)
        provider.shutdown()
