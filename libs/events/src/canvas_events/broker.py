"""A RabbitMQ connection that reconnects forever, a publisher that waits for confirms,
and consumers whose handlers say what happens to a message with named outcomes.

Delivery is at-least-once: a message is acked only after its handler returned, so a
crash redelivers it and handlers must be idempotent. What happens to a message:

- the handler returns None or :data:`ACK`: acked.
- it returns :class:`DeadLetter` or raises :class:`~canvas_events.errors.PoisonMessage`
  (also raised, before the handler runs, for a body that is not a valid envelope, an
  unknown event type or a newer schema version): published to the dead-letter queue
  with the reason in the ``x-canvas-error`` header, logged, acked.
- it raises an error that says the database or the broker is away (:func:`is_transient`:
  connection lost, read-only, disk full, a timeout): requeued after a pause that grows
  with the outage, as often as it takes; an outage says nothing about the message and
  never dead-letters it.
- it raises anything else, or returns :class:`Retry`: tried again after a pause, and
  dead-lettered after ``max_attempts`` (the count travels in ``x-canvas-attempts``).

A batch (a message of type ``Batch`` whose body is an array of envelopes) is handled an
event at a time, and each event meets its own outcome: acked with the batch, or
dead-lettered or redelivered as a message of its own (docs/events.md, "Batches").

Publishing waits for the broker's confirm, and a message that must reach a queue is
published ``mandatory``: one that no queue takes (an operator deleted it) comes back
and raises :class:`PublishError`, never passes for delivered.

Why a supervisor of our own rather than aio-pika's robust connection: robust
connections restore only what is still referenced, and consumers have been reported
not to come back after an ungraceful broker restart, nor after the broker cancelled
them (aio-pika issues 231, 334, 626 and 632; docs/events.md, "Topology"). Here every
(re)connect declares the topology and starts every consumer again from scratch; a
consumer the broker cancels (its queue deleted) makes the service reconnect; and the
topology is declared again every ``topology_interval`` seconds, and at once after a
returned message, so that queues an operator deleted come back within seconds even
where nobody consumes them.

Which of these happens is decided apart from AMQP: :class:`Deliveries` runs the handler
and returns a :data:`Verdict` (ack, dead-letter, requeue as is, redeliver with one more
attempt counted); the :class:`Broker` only carries it out on RabbitMQ (ack, nack,
republish with the attempts header, publish to the dead-letter exchange), and
:class:`canvas_events.testing.InMemoryBroker` carries out the same verdicts in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, cast

import aio_pika
import aiormq
import orjson
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from canvas_events import tracing
from canvas_events.envelope import Envelope, parse_json
from canvas_events.errors import PoisonMessage, PublishError
from canvas_events.events import event_class
from canvas_events.logging import redact
from canvas_events.postgres import is_outage
from canvas_events.runtime import cancel_and_wait
from canvas_events.topology import (
    BATCH,
    QueueSpec,
    QueueType,
    Topology,
    dead_letter_queue_arguments,
    other_type,
)
from canvas_events.transport import CoalescingConnection, CoalescingWriter

if TYPE_CHECKING:
    from canvas_events.settings import CommonSettings

log = structlog.get_logger("canvas_events.broker")

ATTEMPTS_HEADER: Final = "x-canvas-attempts"
ERROR_HEADER: Final = "x-canvas-error"
ROUTING_KEY_HEADER: Final = "x-canvas-routing-key"
QUEUE_HEADER: Final = "x-canvas-queue"
DEAD_LETTERED_AT_HEADER: Final = "x-canvas-dead-lettered-at"
# What a quorum queue says of the delivery at hand (how often it was returned): a copy,
# redelivered or dead-lettered, is a new message and does not carry it.
DELIVERY_COUNT_HEADER: Final = "x-delivery-count"
# The longest reason a dead letter carries.
MAX_REASON_CHARS: Final = 1000
PERSISTENT: Final = int(aio_pika.DeliveryMode.PERSISTENT)


@dataclass(frozen=True)
class Ack:
    """The message is handled: ack it."""


@dataclass(frozen=True)
class Retry:
    """Try again after ``delay`` seconds; counts towards the consumer's ``max_attempts``."""

    reason: str
    delay: float = 1.0


@dataclass(frozen=True)
class DeadLetter:
    """The message can never be handled: move it to the dead-letter queue."""

    reason: str


@dataclass(frozen=True)
class Requeue:
    """Verdict on a message whose handler met an outage: put it back as it is after
    ``delay`` seconds; the try does not count towards ``max_attempts``."""

    delay: float


@dataclass(frozen=True)
class Redeliver:
    """Verdict on a message to try again: after ``delay`` seconds, queue a copy that
    carries ``attempts`` (the failed tries so far) and let the original go."""

    attempts: int
    delay: float


@dataclass(frozen=True)
class Part:
    """What meets ``verdict``: the whole message (``body`` is its body), or one event of
    a batch as a message of its own, with the event's ids where it has them."""

    body: bytes
    verdict: DeadLetter | Redeliver
    message_id: str | None = None
    correlation_id: str | None = None
    type: str | None = None
    # The event's own traceparent, from the batch's headers (tracing.BATCH_TRACEPARENTS).
    traceparent: str | None = None

    @classmethod
    def of_event(
        cls, item: Any, verdict: DeadLetter | Redeliver, traceparent: str | None = None
    ) -> Part:
        """The part for a batch's ``item`` (as parsed), readable or not; its body is
        serialised here, only for the events that need a message of their own."""
        fields = item if isinstance(item, dict) else {}
        message_id, correlation_id, type_ = (
            value if isinstance(value, str) else None
            for value in (fields.get(name) for name in ("event_id", "correlation_id", "type"))
        )
        return cls(orjson.dumps(item), verdict, message_id, correlation_id, type_, traceparent)

    def ids(self, message: AbstractIncomingMessage) -> tuple[str | None, str | None, str | None]:
        """The message id, correlation id and type of the copy that carries this part."""
        if self.body is message.body:
            return message.message_id, message.correlation_id, message.type
        return self.message_id, self.correlation_id, self.type

    def headers(self, message: AbstractIncomingMessage, added: dict[str, Any]) -> dict[str, Any]:
        """The headers of the copy that carries this part: ``message``'s and ``added``;
        one event of a batch carries its own traceparent instead of the batch's list."""
        if self.body is message.body:
            return {**(message.headers or {}), **added}
        return {**tracing.part_headers(message.headers, self.traceparent), **added}


@dataclass(frozen=True)
class Split:
    """Verdict on a batch whose handlers took some events and not others: each of
    ``parts`` is dead-lettered or redelivered as a message of its own, then the batch is
    acked (its other events are handled)."""

    parts: tuple[Part, ...]


ACK: Final = Ack()
Outcome = Ack | Retry | DeadLetter
Handler = Callable[[Envelope, AbstractIncomingMessage], Awaitable[Outcome | None]]
# What happens to a delivered message. A DeadLetter verdict's reason is final: redacted
# and cut to MAX_REASON_CHARS, as the dead-letter queue gets it.
Verdict = Ack | DeadLetter | Requeue | Redeliver | Split


# The ``canvas.outcome`` of a consumed event's span.
_OUTCOMES: Final[dict[type, str]] = {
    Ack: "ack",
    DeadLetter: "dead_letter",
    Requeue: "requeue",
    Redeliver: "redeliver",
    Split: "split",
}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says that the database or the broker is away (an outage), not
    that the message at hand is bad: its handler's caller waits and tries again, with
    no limit on the tries."""
    return is_outage(exc) or isinstance(
        exc, aiormq.exceptions.AMQPConnectionError | aiormq.exceptions.ChannelInvalidStateError
    )


@dataclass(frozen=True)
class Consumer:
    """A queue to consume and the handler that takes its messages.

    ``prefetch`` bounds how many messages are in flight at once (aio-pika's default is
    unlimited); each is handled in its own task, so handlers run concurrently.
    """

    queue: QueueSpec
    handler: Handler
    prefetch: int = 32
    max_attempts: int = 5
    retry_delay: float = 1.0
    # Longest pause before a message that met an outage is requeued.
    max_outage_delay: float = 30.0
    # The handler takes a batch's events side by side (the orchestrator's group commit
    # records them in one transaction); otherwise one after another, in order.
    concurrent_batches: bool = False


class Deliveries:
    """What happens to a delivered message, whatever carries it.

    :meth:`handle` reads the body (a body that is not a valid envelope, of an unknown
    type or a newer schema is dead-lettered before the handler runs), runs the
    consumer's handler and turns what it returned or raised into a :data:`Verdict`.
    Settling it (ack, nack, republish, dead-letter exchange) is the transport's part.
    Keeps, per consumed queue, when the current outage began: one per broker.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Per consumed queue: when the current outage began, and when it was last logged.
        self._outages: dict[str, float] = {}
        self._outage_logged: dict[str, float] = {}

    async def handle(self, consumer: Consumer, message: AbstractIncomingMessage) -> Verdict:
        """Run ``consumer``'s handler on ``message`` (on each of its events, for a
        batch); say what to do with the message."""
        if message.type == BATCH:
            return await self._handle_batch(consumer, message)
        structlog.contextvars.clear_contextvars()
        try:
            envelope = _known(Envelope.from_json(message.body))
        except PoisonMessage as exc:
            return self.dead_letter(consumer, message, str(exc))
        return await self._run(consumer, message, envelope, _traceparent(message))

    async def _handle_batch(self, consumer: Consumer, message: AbstractIncomingMessage) -> Verdict:
        """Each event of a batch meets its own verdict: acked with the batch when its
        handler took it, a message of its own when dead-lettered or redelivered; the
        whole batch is requeued when one of them met an outage (handlers are
        idempotent: those already taken change nothing the second time)."""
        try:
            items = batch_items(message.body)
        except PoisonMessage as exc:
            return self.dead_letter(consumer, message, str(exc))

        async def one(item: Any, traceparent: str | None) -> tuple[Any, Verdict, str | None]:
            structlog.contextvars.clear_contextvars()
            try:
                envelope = _known(Envelope.from_parsed(item))
            except PoisonMessage as exc:
                return item, self.dead_letter(consumer, message, str(exc)), traceparent
            return item, await self._run(consumer, message, envelope, traceparent), traceparent

        traced = [(item, _traceparent(message, index)) for index, item in enumerate(items)]
        if consumer.concurrent_batches:
            # gather() runs each in a task of its own, with a copy of the log context.
            results = await asyncio.gather(*(one(*pair) for pair in traced))
        else:
            results = [await one(*pair) for pair in traced]
        requeues = [verdict.delay for _, verdict, _ in results if isinstance(verdict, Requeue)]
        if requeues:
            return Requeue(max(requeues))
        parts = tuple(
            Part.of_event(item, verdict, traceparent)
            for item, verdict, traceparent in results
            if isinstance(verdict, DeadLetter | Redeliver)
        )
        return Split(parts) if parts else ACK

    async def _run(
        self,
        consumer: Consumer,
        message: AbstractIncomingMessage,
        envelope: Envelope,
        traceparent: str | None,
    ) -> Verdict:
        """The verdict of ``consumer``'s handler on ``envelope``, logged in its context
        and traced as its own span (the child of the span that published it)."""
        structlog.contextvars.bind_contextvars(
            job_id=str(envelope.job_id) if envelope.job_id else None,
            correlation_id=envelope.correlation_id,
            event_type=envelope.type,
        )
        with tracing.consuming(envelope, consumer.queue.name, traceparent) as span:
            verdict = await self._verdict_of(consumer, message, envelope)
            span.set_attribute("canvas.outcome", _OUTCOMES[type(verdict)])
            if isinstance(verdict, DeadLetter):
                tracing.failed(span, verdict.reason)
            elif not isinstance(verdict, Ack):
                tracing.failed(span, f"handled later ({_OUTCOMES[type(verdict)]})")
        return verdict

    async def _verdict_of(
        self, consumer: Consumer, message: AbstractIncomingMessage, envelope: Envelope
    ) -> Verdict:
        outcome: Outcome
        try:
            outcome = await consumer.handler(envelope, message) or ACK
        except PoisonMessage as exc:
            outcome = DeadLetter(str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_transient(exc):
                # Not the message's fault: wait and requeue, as often as it takes.
                return Requeue(self._outage_pause(consumer, exc))
            log.exception("handler failed")
            outcome = Retry(f"{type(exc).__name__}: {exc}", consumer.retry_delay)
        else:
            self._outages.pop(consumer.queue.name, None)
        finally:
            structlog.contextvars.unbind_contextvars("event_type")
        return self.verdict(consumer, message, outcome)

    def verdict(
        self, consumer: Consumer, message: AbstractIncomingMessage, outcome: Outcome
    ) -> Verdict:
        """What a handler's ``outcome`` means for ``message``: a Retry counts one more
        attempt (``x-canvas-attempts``) and dead-letters at ``consumer.max_attempts``."""
        if isinstance(outcome, Ack):
            return ACK
        if isinstance(outcome, DeadLetter):
            return self.dead_letter(consumer, message, outcome.reason)
        attempts = attempts_so_far(message) + 1
        if attempts >= consumer.max_attempts:
            return self.dead_letter(
                consumer, message, f"failed {attempts} times; last: {redact(outcome.reason)}"
            )
        return Redeliver(attempts, outcome.delay)

    def dead_letter(
        self, consumer: Consumer, message: AbstractIncomingMessage, reason: str
    ) -> DeadLetter:
        """The verdict that moves ``message`` to the dead-letter queue, logged."""
        reason = redact(reason)[:MAX_REASON_CHARS]
        log.error(
            "message dead-lettered",
            queue=consumer.queue.name,
            dead_letter_queue=consumer.queue.dead_letter_queue,
            routing_key=message.routing_key,
            message_id=message.message_id,
            reason=reason,
        )
        return DeadLetter(reason)

    def _outage_pause(self, consumer: Consumer, exc: BaseException) -> float:
        """The pause before requeueing a message whose handler met an outage: half as
        long as the outage has lasted so far (at least ``retry_delay``, at most
        ``max_outage_delay``, with some jitter), so that a long outage costs each message
        in hand a try every half minute rather than a storm of them. Logged every few
        seconds, not for every message."""
        name = consumer.queue.name
        now = self._clock()
        since = self._outages.setdefault(name, now)
        delay = min(consumer.max_outage_delay, max(consumer.retry_delay, (now - since) / 2))
        delay *= random.uniform(0.8, 1.2)
        if now - self._outage_logged.get(name, -60.0) >= 5.0:
            self._outage_logged[name] = now
            log.warning(
                "handler met an outage; requeueing",
                queue=name,
                error=redact(repr(exc)),
                outage_seconds=round(now - since, 1),
                retry_in=round(delay, 1),
            )
        return delay


def _traceparent(message: AbstractIncomingMessage, index: int | None = None) -> str | None:
    """The traceparent ``message`` carries (for a batch, that of its event at ``index``);
    None, without a look at the headers, while tracing is off."""
    return tracing.parent_in(message.headers, index) if tracing.enabled() else None


def _known(envelope: Envelope) -> Envelope:
    """``envelope``, if this build knows its type and schema. Unknown types and newer
    schemas are poison for every consumer, also for one whose handler would skip the
    event unread (the notifier skips what it does not show): otherwise a message this
    build cannot read vanishes unseen."""
    event_class(envelope)
    return envelope


def batch_items(body: bytes) -> list[Any]:
    """The parsed items of a batch's body (a PoisonMessage unless a JSON array)."""
    items = parse_json(body)
    if not isinstance(items, list):
        raise PoisonMessage("batch body is not a JSON array")
    return items


def envelopes_of(message: AbstractIncomingMessage) -> list[Envelope]:
    """The envelopes ``message`` carries: its one, or a batch's, in order (raises
    :class:`~canvas_events.errors.PoisonMessage` for a body that is neither)."""
    if message.type != BATCH:
        return [Envelope.from_json(message.body)]
    return [Envelope.from_parsed(item) for item in batch_items(message.body)]


def envelope_properties(
    envelope: Envelope, priority: int | None, headers: dict[str, Any] | None = None
) -> aiormq.spec.Basic.Properties:
    """The AMQP properties of a message that carries ``envelope``."""
    return aiormq.spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=str(envelope.event_id),
        correlation_id=envelope.correlation_id,
        message_type=envelope.type,
        timestamp=envelope.occurred_at,
        priority=priority,
        headers=headers,
    )


def batch_properties(headers: dict[str, Any] | None = None) -> aiormq.spec.Basic.Properties:
    """The AMQP properties of a batch (docs/events.md, "Batches")."""
    return aiormq.spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_type=BATCH,
        timestamp=datetime.now(UTC),
        headers=headers,
    )


def batch_body(bodies: Iterable[bytes]) -> bytes:
    """The body of a batch message: the envelopes' JSON as one JSON array."""
    return b"[" + b",".join(bodies) + b"]"


def original_routing_key(message: AbstractIncomingMessage) -> str:
    """The key the message was first published with, also after a retry's republish."""
    kept = (message.headers or {}).get(ROUTING_KEY_HEADER)
    return kept if isinstance(kept, str) and kept else message.routing_key or ""


def attempts_so_far(message: AbstractIncomingMessage) -> int:
    """The failed tries ``x-canvas-attempts`` counts (0 on a first delivery)."""
    value = (message.headers or {}).get(ATTEMPTS_HEADER, 0)
    return value if isinstance(value, int) else 0


def redeliver_headers(message: AbstractIncomingMessage, verdict: Redeliver) -> dict[str, Any]:
    """The headers a :class:`Redeliver` copy adds to ``message``'s. The copy goes through
    the default exchange, which would lose the routing key the message was published
    with: it is kept for the dead-letter record and replays."""
    return {ATTEMPTS_HEADER: verdict.attempts, ROUTING_KEY_HEADER: original_routing_key(message)}


def dead_letter_headers(
    consumer: Consumer, message: AbstractIncomingMessage, verdict: DeadLetter
) -> dict[str, Any]:
    """The headers a dead-lettered copy adds to ``message``'s: why, from where, when."""
    return {
        ERROR_HEADER: verdict.reason,
        QUEUE_HEADER: consumer.queue.name,
        ROUTING_KEY_HEADER: original_routing_key(message),
        DEAD_LETTERED_AT_HEADER: datetime.now(UTC).isoformat(),
    }


class Acks:
    """The acks of one consuming channel, sent together.

    A handler's ack does not go out at once: at the end of the event loop's turn, the
    longest run of delivered messages that are all settled is acked with one
    ``basic.ack(multiple=True)`` (a group commit settles dozens of messages at once: one
    frame instead of dozens). A message settled behind one still in hand (a slow
    handler, a pause before a retry) is acked on its own after ``straggler_delay``, so
    that it does not hold the prefetch window. Nacks go out at once, as before; a tag
    counts as settled only once its nack is queued, so that no multiple ack covers it.
    """

    def __init__(
        self, channel: aiormq.abc.AbstractChannel, *, straggler_delay: float = 0.05
    ) -> None:
        self._channel = channel
        self._straggler_delay = straggler_delay
        # Tags delivered and not yet passed by a multiple ack, lowest first.
        self._delivered: list[int] = []
        # Settled tags among them: True when the tag still needs its ack.
        self._settled: dict[int, bool] = {}
        self._flush_scheduled = False
        self._stragglers: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def delivered(self, tag: int) -> None:
        """A message came with ``tag`` (in delivery order)."""
        heapq.heappush(self._delivered, tag)

    def ack(self, tag: int) -> None:
        """Ack ``tag`` soon (see the class docstring)."""
        self._settled[tag] = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def nacked(self, tag: int) -> None:
        """``tag`` was nacked or rejected on its own (the frame is queued)."""
        self._settled[tag] = False
        self.ack_pending_prefix()

    def ack_pending_prefix(self) -> None:
        """Send the ack of the settled run of tags now (if it has any to ack)."""
        top = None
        while self._delivered and self._delivered[0] in self._settled:
            tag = heapq.heappop(self._delivered)
            if self._settled.pop(tag):
                top = tag
        if top is not None:
            self._send(top, multiple=True)

    def flush(self) -> None:
        """Send every ack now: the settled run as one, the stragglers one by one."""
        self.ack_pending_prefix()
        for tag, needs_ack in list(self._settled.items()):
            if needs_ack:
                self._settled[tag] = False
                self._send(tag, multiple=False)

    async def sent(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) until every ack sent so far is queued to be written."""
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=timeout)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.ack_pending_prefix()
        if any(self._settled.values()) and self._stragglers is None:
            loop = asyncio.get_running_loop()
            self._stragglers = loop.call_later(self._straggler_delay, self._ack_stragglers)

    def _ack_stragglers(self) -> None:
        self._stragglers = None
        self.flush()

    def _send(self, tag: int, *, multiple: bool) -> None:
        # Queued, not drained: the channel's frames go out in order, a close after them.
        # A channel closed meanwhile redelivers what it did not get the ack of.
        ack = self._channel.basic_ack(delivery_tag=tag, multiple=multiple, wait=False)
        task = asyncio.ensure_future(_settle(ack))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)


class BrokerBase:
    """What every broker a service works with shares (:class:`Broker`, and the in-memory
    one of tests): the connection's state as the service sees it (up or not, since when,
    how many times it came up, and why not), and the publishing API, which builds each
    message's properties and body; a kind of broker supplies ``_publish``."""

    def __init__(self) -> None:
        self._connected = asyncio.Event()
        self.last_error: str | None = "not connected yet"
        self.connect_count = 0
        # When the current connection's consumers were all started (None while down).
        self.connected_at: datetime | None = None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the connection is up (raises TimeoutError after ``timeout``)."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    @property
    def connected(self) -> bool:
        """Whether the connection, the publishing channel and every consumer are up."""
        return self._connected.is_set()

    def _up(self) -> None:
        """The connection and every consumer have just come up."""
        self.connect_count += 1
        self.connected_at = datetime.now(UTC)
        self.last_error = None
        self._connected.set()

    async def publish(
        self,
        envelope: Envelope,
        routing_key: str,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        mandatory: bool = True,
        parent: str | None = None,
    ) -> None:
        """Publish a persistent message and wait for the broker's confirm.

        Raises :class:`PublishError` when the broker is away, nacks, does not confirm
        within ``timeout`` (default: the broker's ``publish_timeout``), or, for a
        ``mandatory`` message, no queue takes it: the message may then not be queued,
        and the caller must say so (a 503) or try again. Publish with
        ``mandatory=False`` what may rightly reach no queue (events for notifiers,
        which may all be away).

        Traced (when traces are on) as a publish span, the child of ``parent`` (a
        traceparent: work recorded elsewhere) or else of the current span; the message
        carries the span's traceparent in its headers.
        """
        with tracing.publishing([envelope], routing_key, [parent]) as traceparents:
            # The properties go to aio-pika's own channel as they are: an aio_pika.Message
            # would be built only to be turned into these (a third of a relayed event's CPU).
            headers = tracing.headers_of(traceparents)
            properties = envelope_properties(envelope, priority, headers)
            await self._publish(envelope.to_json(), routing_key, properties, mandatory, timeout)

    async def publish_envelopes(
        self,
        envelopes: Sequence[Envelope],
        routing_key: str,
        *,
        parents: Sequence[str | None] = (),
        timeout: float | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish ``envelopes`` as one batch (:meth:`publish_batch`), each event traced as
        :meth:`publish` traces one (``parents`` in the same order, when given)."""
        with tracing.publishing(envelopes, routing_key, parents) as traceparents:
            await self.publish_batch(
                [envelope.to_json() for envelope in envelopes],
                routing_key,
                timeout=timeout,
                mandatory=mandatory,
                headers=tracing.headers_of(traceparents),
            )

    async def publish_batch(
        self,
        bodies: Sequence[bytes],
        routing_key: str,
        *,
        timeout: float | None = None,
        mandatory: bool = True,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish several envelopes (their JSON ``bodies``, in order) as one message of
        type :data:`~canvas_events.topology.BATCH`, as :meth:`publish` does one, but
        untraced (:meth:`publish_envelopes` traces them)."""
        properties = batch_properties(headers)
        await self._publish(batch_body(bodies), routing_key, properties, mandatory, timeout)

    #: Sends one message (body, routing key, properties, mandatory, timeout) and waits for
    #: the broker's confirm (see :meth:`publish`): what each kind of broker supplies.
    _publish: Callable[
        [bytes, str, aiormq.spec.Basic.Properties, bool, float | None], Awaitable[None]
    ]


class Broker(BrokerBase):
    """One connection to RabbitMQ for one service process.

    ``start()`` returns at once; the connection comes up in the background and is made
    again whenever it drops, so a service starts and stays up with the broker away.
    """

    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        connection_name: str,
        publish_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        heartbeat: int = 10,
        topology_interval: float = 10.0,
    ) -> None:
        self._url = url
        self.topology = topology
        self._declarer = Declarer(topology)
        self._connection_name = connection_name
        self._publish_timeout = publish_timeout
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._topology_interval = topology_interval
        self._consumers: list[Consumer] = []
        self._connection: AbstractConnection | None = None
        # The current connection's socket writer (canvas_events.transport).
        self._writer: CoalescingWriter | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dead_letter_exchange: AbstractExchange | None = None
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._subscriptions: list[tuple[AbstractQueue, str]] = []
        # Per consumed queue, the acks of its current channel.
        self._acks: dict[str, Acks] = {}
        # Set when the current connection is gone, whoever closed it.
        self._lost = asyncio.Event()
        # Set to declare the topology again now (a publish came back unrouted).
        self._redeclare = asyncio.Event()
        # Decides what happens to each delivered message; this class only carries it out.
        self._deliveries = Deliveries()
        super().__init__()

    @classmethod
    def of(cls, settings: CommonSettings, connection_name: str, **options: Any) -> Broker:
        """A broker for the settings' AMQP_URL and topology; ``connection_name`` is what
        the management UI shows for the connection."""
        return cls(
            settings.amqp_url.get_secret_value(),
            settings.topology,
            connection_name=connection_name,
            **options,
        )

    @property
    def writer(self) -> CoalescingWriter | None:
        """The current connection's socket writer (None while down): what it was asked
        to write and what it wrote (canvas_events.transport)."""
        return self._writer

    # -- lifecycle -------------------------------------------------------------------

    def add_consumer(self, consumer: Consumer) -> None:
        """Consume ``consumer.queue`` on every (re)connect. Call before ``start()``."""
        self._consumers.append(consumer)

    async def start(self) -> None:
        """Start connecting in the background."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop consuming, let handlers in flight finish (up to ``drain_timeout``), close."""
        self._stopping = True
        # Cancel the subscriptions first: otherwise every ack during the drain lets the
        # broker deliver another message, whose work the close then cuts off midway.
        subscriptions, self._subscriptions = self._subscriptions, []
        for queue, tag in subscriptions:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=drain_timeout)
        # What the handlers settled goes out before the connection closes (else it would
        # all be delivered again).
        for acks in self._acks.values():
            acks.flush()
        await asyncio.gather(*(acks.sent() for acks in self._acks.values()))
        if self._supervisor is not None:
            await cancel_and_wait(self._supervisor)
        await self._close_connection()

    async def _supervise(self) -> None:
        delay = 0.2
        while not self._stopping:
            try:
                await self._connect()
                delay = 0.2
                log.info("broker connected", connection=self._connection_name)
                keeper = asyncio.create_task(self._keep_topology(), name="broker-topology")
                try:
                    await self._lost.wait()
                finally:
                    keeper.cancel()
                if not self._stopping:
                    self.last_error = "connection lost"
                    log.warning("broker connection lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = redact(f"{type(exc).__name__}: {exc}")
                log.warning("broker unreachable; retrying", error=self.last_error, retry_in=delay)
            finally:
                self._connected.clear()
            await self._close_connection()
            if self._stopping:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        connection = await aio_pika.connect(
            self._url,
            timeout=self._connect_timeout,
            client_properties={"connection_name": self._connection_name},
            heartbeat=self._heartbeat,
            connection_class=CoalescingConnection,
        )
        self._connection = connection
        self._writer = connection.writer
        # aio-pika resolves connection.closed() only when *we* call close(): a connection
        # the broker closed (a restart: CONNECTION_FORCED) or that dropped only runs the
        # close callbacks. Waiting on closed() left a service without consumers (the
        # gateway, the relay's publisher) on a dead connection for good, /ready still 200.
        lost = self._lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        channel = await connection.channel(publisher_confirms=True)
        self._publish_channel = channel
        # A publishing channel the broker closed would fail every publish from then on.
        channel.close_callbacks.add(self._on_channel_close(connection, "publishing"))
        self._subscriptions = []
        self._exchange, self._dead_letter_exchange = await declare_topology(
            connection, channel, self.topology, self._declarer
        )
        for consumer in self._consumers:
            await self._start_consumer(connection, consumer)
        self._up()

    async def _start_consumer(self, connection: AbstractConnection, consumer: Consumer) -> None:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=consumer.prefetch)
        if consumer.queue.queue_type is None:
            queue = await declare_queue(channel, consumer.queue, self.topology)
        else:
            # Declared (of whichever type it has) on a channel of its own; a passive
            # declare here cannot be refused for its arguments.
            await self._declarer.declare_spec(connection, consumer.queue)
            queue = await channel.declare_queue(consumer.queue.name, passive=True)

        acks = self._acks[consumer.queue.name] = Acks(await channel.get_underlay_channel())

        async def on_message(message: AbstractIncomingMessage) -> None:
            tag = message.delivery_tag
            assert tag is not None  # consumed with acks
            acks.delivered(tag)
            if self._stopping:
                # Delivered just before the cancel: leave it to another consumer.
                await _settle(message.nack(requeue=True))
                acks.nacked(tag)
                return
            task = asyncio.current_task()
            if task is not None:
                self._in_flight.add(task)
            try:
                await self._handle(consumer, message, acks)
            finally:
                if task is not None:
                    self._in_flight.discard(task)

        tag = await queue.consume(on_message)
        self._subscriptions.append((queue, tag))
        # A channel closed under us (e.g. a delivery acked twice) would silently stop this
        # consumer; close the whole connection so that the supervisor starts everything again.
        channel.close_callbacks.add(self._on_channel_close(connection, consumer.queue.name))
        # So would a consumer the broker cancelled (its queue deleted): the channel stays
        # open, nothing arrives any more. Reconnecting declares the queue again.
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(
            self._on_consumer_cancel(connection, consumer.queue.name)
        )

    def _on_channel_close(self, connection: AbstractConnection, what: str) -> Callable[..., None]:
        def on_channel_close(_: Any, exc: BaseException | None = None) -> None:
            self._reconnect(connection, "channel closed; reconnecting", channel=what)

        return on_channel_close

    def _on_consumer_cancel(
        self, connection: AbstractConnection, queue: str
    ) -> Callable[..., None]:
        def on_consumer_cancel(_: Any) -> None:
            self._reconnect(
                connection,
                "consumer cancelled by the broker (queue deleted?); reconnecting",
                queue=queue,
            )

        return on_consumer_cancel

    def _reconnect(self, connection: AbstractConnection, why: str, **fields: Any) -> None:
        """Drop ``connection`` (if still the current one): the supervisor connects again,
        declares the topology and starts every consumer."""
        if not self._stopping and self._connection is connection:
            log.warning(why, **fields)
            asyncio.get_running_loop().create_task(connection.close())
            self._lost.set()

    async def _keep_topology(self) -> None:
        """Declare the topology again every ``topology_interval`` seconds, or at once when
        a publish came back unrouted: queues an operator deleted come back."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._redeclare.wait(), self._topology_interval)
            self._redeclare.clear()
            connection = self._connection
            if connection is None or connection.is_closed:
                continue
            try:
                channel = await connection.channel(publisher_confirms=False)
                try:
                    await declare_topology(connection, channel, self.topology, self._declarer)
                finally:
                    if not channel.is_closed:
                        await channel.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("declaring the topology again failed", error=redact(repr(exc)))

    async def _close_connection(self) -> None:
        connection, self._connection, self._writer = self._connection, None, None
        self._publish_channel = self._exchange = self._dead_letter_exchange = None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()

    # -- publishing ------------------------------------------------------------------

    async def _publish(
        self,
        body: bytes,
        routing_key: str,
        properties: aiormq.spec.Basic.Properties,
        mandatory: bool,
        timeout: float | None,
    ) -> None:
        exchange, publish_channel = self._exchange, self._publish_channel
        writer = self._writer
        if exchange is None or publish_channel is None or not self._connected.is_set():
            raise PublishError(f"broker not connected ({self.last_error})")
        try:
            if publish_channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
            # aiormq's own channel: its basic_publish takes ``wait`` (its abc does not say).
            channel = cast(aiormq.Channel, await publish_channel.get_underlay_channel())
            async with asyncio.timeout(timeout or self._publish_timeout):
                if writer is not None:
                    # The frame is queued without waiting for its write (wait=False
                    # below): wait here instead while the socket is backed up.
                    await writer.writable()
                # wait=False: the channel's lock is held only to queue the frame, not
                # until the writer task wrote it, so that the publishes of one turn of
                # the loop are queued together and leave in one write
                # (canvas_events.transport). The queue is FIFO under that lock: the
                # publishes keep their order.
                confirmation = await channel.basic_publish(
                    body,
                    exchange=exchange.name,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                    wait=False,
                )
        except TimeoutError as exc:
            raise PublishError("broker did not confirm in time") from exc
        except (aiormq.exceptions.AMQPError, OSError, EOFError, RuntimeError) as exc:
            raise PublishError(f"broker refused the message: {type(exc).__name__}") from exc
        self._check_confirmation(confirmation, routing_key)

    def _check_confirmation(self, confirmation: object, routing_key: str) -> None:
        """Raise :class:`PublishError` unless ``confirmation`` is the broker's ack; a
        message that came back unrouted also has the topology declared again."""
        if isinstance(confirmation, aiormq.spec.Basic.Ack):
            return
        if isinstance(confirmation, aiormq.spec.Basic.Nack):
            raise PublishError("broker refused the message (nack)")
        self._redeclare.set()
        raise PublishError(f"no queue took the message ({routing_key}); declaring queues again")

    async def queue_stats(self, queue_name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or None when it does not exist or the
        broker is away. Uses a passive declare on a throwaway channel."""
        connection = self._connection
        if connection is None or not self._connected.is_set():
            return None
        try:
            channel = await connection.channel(publisher_confirms=False)
        except Exception:
            return None
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            result = queue.declaration_result
            return result.message_count or 0, result.consumer_count or 0
        except Exception:
            return None
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()

    # -- consuming -------------------------------------------------------------------

    async def _handle(
        self, consumer: Consumer, message: AbstractIncomingMessage, acks: Acks
    ) -> None:
        tag = message.delivery_tag
        assert tag is not None
        verdict = await self._deliveries.handle(consumer, message)
        if isinstance(verdict, Ack):
            acks.ack(tag)
            return
        if isinstance(verdict, Requeue):
            await asyncio.sleep(verdict.delay)
            await _settle(message.nack(requeue=True))
            acks.nacked(tag)
            return
        parts = verdict.parts if isinstance(verdict, Split) else (Part(message.body, verdict),)
        if delays := [part.verdict.delay for part in parts if isinstance(part.verdict, Redeliver)]:
            await asyncio.sleep(max(delays))
        for part in parts:
            if isinstance(part.verdict, DeadLetter):
                sent = await self._dead_letter(consumer, message, part)
                if not sent:
                    # No dead-letter queue took it (deleted, or the broker away): keep
                    # the message, and try again once the queue is declared again.
                    await asyncio.sleep(consumer.retry_delay)
            else:
                sent = await self._redeliver(consumer, message, part)
            if not sent:
                await _settle(message.nack(requeue=True))
                acks.nacked(tag)
                return
        acks.ack(tag)

    async def _redeliver(
        self, consumer: Consumer, message: AbstractIncomingMessage, part: Part
    ) -> bool:
        """A copy of ``part`` back onto the consumer's queue, through the default exchange,
        with the attempts counted; whether the broker took it."""
        assert isinstance(part.verdict, Redeliver)
        channel = self._publish_channel
        if channel is None:
            return False
        copy = _copy(message, part, redeliver_headers(message, part.verdict))
        return await self._send(channel.default_exchange, copy, consumer.queue.name)

    async def _dead_letter(
        self, consumer: Consumer, message: AbstractIncomingMessage, part: Part
    ) -> bool:
        """A copy of ``part`` to the consumer's dead-letter queue; whether it took it."""
        assert isinstance(part.verdict, DeadLetter)
        exchange = self._dead_letter_exchange
        if exchange is None:
            return False
        copy = _copy(message, part, dead_letter_headers(consumer, message, part.verdict))
        return await self._send(exchange, copy, consumer.queue.dead_letter_queue)

    async def _send(self, exchange: AbstractExchange, copy: aio_pika.Message, key: str) -> bool:
        try:
            confirmation = await exchange.publish(copy, key, timeout=self._publish_timeout)
            self._check_confirmation(confirmation, key)
        except Exception:
            return False
        return True


def _copy(
    message: AbstractIncomingMessage, part: Part, headers: dict[str, Any]
) -> aio_pika.Message:
    """A persistent copy of ``message`` (of one event of it, for a batch's part)."""
    message_id, correlation_id, type_ = part.ids(message)
    copied = part.headers(message, headers)
    copied.pop(DELIVERY_COUNT_HEADER, None)
    return aio_pika.Message(
        part.body,
        headers=copied,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        correlation_id=correlation_id,
        type=type_,
        priority=message.priority,
        timestamp=message.timestamp or time.time(),
    )


async def _settle(action: Awaitable[None]) -> None:
    """Ack, nack or reject; a channel that closed meanwhile will redeliver anyway."""
    with contextlib.suppress(Exception):
        await action


async def declare_topology(
    connection: AbstractConnection,
    channel: AbstractChannel,
    topology: Topology,
    declarer: Declarer | None = None,
) -> tuple[AbstractExchange, AbstractExchange]:
    """Declare the events exchange and the dead-letter exchange on ``channel``, and every
    durable queue and every dead-letter queue through ``declarer`` (on channels of its
    own; idempotent). Returns (events exchange, dead-letter exchange), on ``channel``."""
    exchange = await channel.declare_exchange(
        topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dlx = await channel.declare_exchange(
        topology.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    declarer = declarer or Declarer(topology)
    for name in topology.dead_letter_queues:
        await declarer.declare(connection, name, dead_letter_queue_arguments, (dlx.name, (name,)))
    for spec in topology.durable_queues:
        await declarer.declare_spec(connection, spec)
    return exchange, dlx


class Declarer:
    """Declares the queues every process shares as ``topology.queue_type``, each on a
    channel of its own: redeclaring a queue with another type is refused
    (PRECONDITION_FAILED) and closes the channel, which must never be one that publishes
    or consumes.

    A queue that exists with the other type (a deployment from before AMQP_QUEUE_TYPE,
    or one that changed it) is kept as it is and works as before; a warning, once per
    process and queue, says how to move it. Any other refusal is raised.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._warned: set[str] = set()

    async def declare_spec(self, connection: AbstractConnection, spec: QueueSpec) -> QueueType:
        """Declare the shared queue ``spec``, bound to the events exchange; its type."""
        dlx = self.topology.dead_letter_exchange

        def arguments(kind: QueueType) -> dict[str, Any]:
            return spec.declare_arguments(dlx, kind)

        return await self.declare(
            connection, spec.name, arguments, (self.topology.exchange, spec.bindings)
        )

    async def declare(
        self,
        connection: AbstractConnection,
        name: str,
        arguments: Callable[[QueueType], dict[str, Any]],
        bindings: tuple[str, Sequence[str]],
    ) -> QueueType:
        """Declare the durable queue ``name`` (``arguments`` of a type) and bind it on
        ``bindings`` (exchange, routing keys); the type it has."""
        wanted = self.topology.queue_type
        try:
            await self._declare(connection, name, arguments(wanted), bindings)
            return wanted
        except aiormq.exceptions.ChannelPreconditionFailed as refused:
            kept = other_type(wanted)
            try:
                await self._declare(connection, name, arguments(kept), bindings)
            except aiormq.exceptions.ChannelPreconditionFailed:
                raise refused from None
        if name not in self._warned:
            self._warned.add(name)
            log.warning(
                "queue kept with the type it has, not AMQP_QUEUE_TYPE",
                queue=name,
                queue_type=kept,
                wanted=wanted,
                how_to_move=(
                    f"let the queue drain (stop the gateways, or wait for it to be "
                    f"empty), delete it (rabbitmqctl delete_queue {name}), and the "
                    f"services declare it again as {wanted} within seconds; "
                    f"docs/events.md, 'Queue types'"
                ),
            )
        return kept

    @staticmethod
    async def _declare(
        connection: AbstractConnection,
        name: str,
        arguments: dict[str, Any],
        bindings: tuple[str, Sequence[str]],
    ) -> None:
        channel = await connection.channel(publisher_confirms=False)
        try:
            queue = await channel.declare_queue(name, durable=True, arguments=arguments)
            exchange, keys = bindings
            for key in keys:
                await queue.bind(exchange, routing_key=key)
        finally:
            if not channel.is_closed:
                await channel.close()


async def declare_queue(
    channel: AbstractChannel, spec: QueueSpec, topology: Topology
) -> AbstractQueue:
    """Declare one per-process queue with its dead-lettering and bind it to the events
    exchange (shared queues go through :class:`Declarer`)."""
    queue = await channel.declare_queue(
        spec.name,
        durable=spec.durable,
        exclusive=spec.exclusive,
        auto_delete=spec.auto_delete,
        arguments=spec.declare_arguments(topology.dead_letter_exchange),
    )
    for key in spec.bindings:
        await queue.bind(topology.exchange, routing_key=key)
    return queue
