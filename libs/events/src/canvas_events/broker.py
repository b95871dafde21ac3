"""A RabbitMQ connection that reconnects forever, a publisher that waits for confirms,
and consumers whose handlers say what happens to a message with named outcomes.

Delivery is at-least-once: a message is acked only after its handler returned, so a
crash redelivers it and handlers must be idempotent. What happens to a message:

- the handler returns None or :data:`ACK`: acked.
- it returns :class:`DeadLetter` or raises :class:`~canvas_events.errors.PoisonMessage`
  (also raised, before the handler runs, for a body that is not a valid envelope, an
  unknown event type or a newer schema version): published to the dead-letter queue
  with the reason in the ``x-canvas-error`` header, logged, acked.
- it raises a connection-type error (database or broker away): requeued after a pause,
  as often as it takes; such an error says nothing about the message.
- it raises anything else, or returns :class:`Retry`: tried again after a pause, and
  dead-lettered after ``max_attempts`` (the count travels in ``x-canvas-attempts``).

Why a supervisor of our own rather than aio-pika's robust connection: robust
connections restore only what is still referenced, and consumers have been reported
not to come back after an ungraceful broker restart (FIELD-NOTES). Here every
(re)connect declares the topology and starts every consumer again from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage, PublishError
from canvas_events.events import event_class
from canvas_events.logging import redact
from canvas_events.topology import QueueSpec, Topology

log = structlog.get_logger("canvas_events.broker")

ATTEMPTS_HEADER: Final = "x-canvas-attempts"
ERROR_HEADER: Final = "x-canvas-error"
ROUTING_KEY_HEADER: Final = "x-canvas-routing-key"


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


ACK: Final = Ack()
Outcome = Ack | Retry | DeadLetter
Handler = Callable[[Envelope, AbstractIncomingMessage], Awaitable[Outcome | None]]

# Errors that say the database or the broker is away, not that the message is bad.
_TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, OSError, TimeoutError)
with contextlib.suppress(ImportError):  # asyncpg is a dependency, but keep this module light
    import asyncpg

    _TRANSIENT += (
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        # admin/crash shutdown and "the database system is starting up": a restart
        asyncpg.exceptions.OperatorInterventionError,
        asyncpg.TooManyConnectionsError,
    )
# Errors that say nothing about the message: a handler's caller requeues on them.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = _TRANSIENT


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


class Broker:
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
    ) -> None:
        self._url = url
        self.topology = topology
        self._connection_name = connection_name
        self._publish_timeout = publish_timeout
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._consumers: list[Consumer] = []
        self._connection: AbstractConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dead_letter_exchange: AbstractExchange | None = None
        self._connected = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._subscriptions: list[tuple[AbstractQueue, str]] = []
        # Set when the current connection is gone, whoever closed it.
        self._lost = asyncio.Event()
        self.last_error: str | None = "not connected yet"
        self.connect_count = 0
        # When the current connection's consumers were all started (None while down).
        self.connected_at: datetime | None = None

    # -- lifecycle -------------------------------------------------------------------

    def add_consumer(self, consumer: Consumer) -> None:
        """Consume ``consumer.queue`` on every (re)connect. Call before ``start()``."""
        self._consumers.append(consumer)

    async def start(self) -> None:
        """Start connecting in the background."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the connection is up (raises TimeoutError after ``timeout``)."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    @property
    def connected(self) -> bool:
        """Whether the connection, the publishing channel and every consumer are up."""
        return self._connected.is_set()

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
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._close_connection()

    async def _supervise(self) -> None:
        delay = 0.2
        while not self._stopping:
            try:
                await self._connect()
                delay = 0.2
                log.info("broker connected", connection=self._connection_name)
                await self._lost.wait()
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
        )
        self._connection = connection
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
        self._exchange, self._dead_letter_exchange = await declare_topology(channel, self.topology)
        for consumer in self._consumers:
            await self._start_consumer(connection, consumer)
        self.connect_count += 1
        self.connected_at = datetime.now(UTC)
        self.last_error = None
        self._connected.set()

    async def _start_consumer(self, connection: AbstractConnection, consumer: Consumer) -> None:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=consumer.prefetch)
        queue = await declare_queue(channel, consumer.queue, self.topology)

        async def on_message(message: AbstractIncomingMessage) -> None:
            if self._stopping:
                # Delivered just before the cancel: leave it to another consumer.
                await _settle(message.nack(requeue=True))
                return
            task = asyncio.current_task()
            if task is not None:
                self._in_flight.add(task)
            try:
                await self._handle(consumer, message)
            finally:
                if task is not None:
                    self._in_flight.discard(task)

        tag = await queue.consume(on_message)
        self._subscriptions.append((queue, tag))
        # A channel closed under us (e.g. a delivery acked twice) would silently stop this
        # consumer; close the whole connection so that the supervisor starts everything again.
        channel.close_callbacks.add(self._on_channel_close(connection, consumer.queue.name))

    def _on_channel_close(self, connection: AbstractConnection, what: str) -> Callable[..., None]:
        def on_channel_close(_: Any, exc: BaseException | None = None) -> None:
            if not self._stopping and self._connection is connection:
                log.warning("channel closed; reconnecting", channel=what)
                asyncio.get_running_loop().create_task(connection.close())
                self._lost.set()

        return on_channel_close

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._publish_channel = self._exchange = self._dead_letter_exchange = None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self,
        envelope: Envelope,
        routing_key: str,
        *,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish a persistent message and wait for the broker's confirm.

        Raises :class:`PublishError` when the broker is away, nacks, or does not confirm
        within ``timeout`` (default: the broker's ``publish_timeout``): the message may
        then not be queued, and the caller must say so (a 503) or try again.
        """
        exchange, publish_channel = self._exchange, self._publish_channel
        if exchange is None or publish_channel is None or not self._connected.is_set():
            raise PublishError(f"broker not connected ({self.last_error})")
        # The properties go to aio-pika's own channel as they are: an aio_pika.Message
        # would be built only to be turned into these (a third of a relayed event's CPU).
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT),
            message_id=str(envelope.event_id),
            correlation_id=envelope.correlation_id,
            message_type=envelope.type,
            timestamp=envelope.occurred_at,
            priority=priority,
        )
        try:
            if publish_channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
            channel = await publish_channel.get_underlay_channel()
            await channel.basic_publish(
                envelope.to_json(),
                exchange=exchange.name,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=timeout or self._publish_timeout,
            )
        except TimeoutError as exc:
            raise PublishError("broker did not confirm in time") from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise PublishError(f"broker refused the message: {type(exc).__name__}") from exc

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

    async def _handle(self, consumer: Consumer, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.clear_contextvars()
        try:
            envelope = Envelope.from_json(message.body)
            # Unknown types and newer schemas are poison for every consumer, also for one
            # whose handler would skip the event unread (the notifier skips what it does
            # not show): otherwise a message this build cannot read vanishes unseen.
            event_class(envelope)
        except PoisonMessage as exc:
            await self._dead_letter(consumer, message, str(exc))
            return
        structlog.contextvars.bind_contextvars(
            job_id=str(envelope.job_id) if envelope.job_id else None,
            correlation_id=envelope.correlation_id,
            event_type=envelope.type,
        )
        outcome: Outcome
        try:
            outcome = await consumer.handler(envelope, message) or ACK
        except PoisonMessage as exc:
            outcome = DeadLetter(str(exc))
        except asyncio.CancelledError:
            raise
        except _TRANSIENT as exc:
            # Not the message's fault: wait and requeue, as often as it takes.
            log.warning("handler hit a transient error; requeueing", error=redact(repr(exc)))
            await asyncio.sleep(consumer.retry_delay)
            await _settle(message.nack(requeue=True))
            return
        except Exception as exc:
            log.exception("handler failed")
            outcome = Retry(f"{type(exc).__name__}: {exc}", consumer.retry_delay)
        finally:
            structlog.contextvars.unbind_contextvars("event_type")

        if isinstance(outcome, Ack):
            await _settle(message.ack())
        elif isinstance(outcome, DeadLetter):
            await self._dead_letter(consumer, message, outcome.reason)
        else:
            await self._retry(consumer, message, outcome)

    async def _retry(
        self, consumer: Consumer, message: AbstractIncomingMessage, outcome: Retry
    ) -> None:
        attempts = _attempts(message) + 1
        if attempts >= consumer.max_attempts:
            await self._dead_letter(
                consumer, message, f"failed {attempts} times; last: {redact(outcome.reason)}"
            )
            return
        await asyncio.sleep(outcome.delay)
        channel = self._publish_channel
        if channel is None:
            await _settle(message.nack(requeue=True))
            return
        # The copy goes through the default exchange, which would lose the routing key the
        # message was published with: keep it for the dead-letter record and replays.
        copy = _copy(
            message, {ATTEMPTS_HEADER: attempts, ROUTING_KEY_HEADER: _routing_key(message)}
        )
        try:
            # Back onto the same queue through the default exchange, with the count.
            await channel.default_exchange.publish(
                copy, consumer.queue.name, timeout=self._publish_timeout
            )
        except Exception:
            await _settle(message.nack(requeue=True))
            return
        await _settle(message.ack())

    async def _dead_letter(
        self, consumer: Consumer, message: AbstractIncomingMessage, reason: str
    ) -> None:
        reason = redact(reason)[:1000]
        log.error(
            "message dead-lettered",
            queue=consumer.queue.name,
            dead_letter_queue=consumer.queue.dead_letter_queue,
            routing_key=message.routing_key,
            message_id=message.message_id,
            reason=reason,
        )
        exchange = self._dead_letter_exchange
        if exchange is not None:
            copy = _copy(
                message,
                {
                    ERROR_HEADER: reason,
                    "x-canvas-queue": consumer.queue.name,
                    ROUTING_KEY_HEADER: _routing_key(message),
                    "x-canvas-dead-lettered-at": datetime.now(UTC).isoformat(),
                },
            )
            try:
                await exchange.publish(
                    copy, consumer.queue.dead_letter_queue, timeout=self._publish_timeout
                )
            except Exception:
                # The queue's own x-dead-letter-exchange still takes it (without our reason).
                await _settle(message.reject(requeue=False))
                return
            await _settle(message.ack())
        else:
            await _settle(message.reject(requeue=False))


def _routing_key(message: AbstractIncomingMessage) -> str:
    """The key the message was first published with, also after a retry's republish."""
    kept = (message.headers or {}).get(ROUTING_KEY_HEADER)
    return kept if isinstance(kept, str) and kept else message.routing_key or ""


def _attempts(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(ATTEMPTS_HEADER, 0)
    return value if isinstance(value, int) else 0


def _copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    return aio_pika.Message(
        message.body,
        headers={**(message.headers or {}), **headers},
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        priority=message.priority,
        timestamp=message.timestamp or time.time(),
    )


async def _settle(action: Awaitable[None]) -> None:
    """Ack, nack or reject; a channel that closed meanwhile will redeliver anyway."""
    with contextlib.suppress(Exception):
        await action


async def declare_topology(
    channel: AbstractChannel, topology: Topology
) -> tuple[AbstractExchange, AbstractExchange]:
    """Declare the events exchange, the dead-letter exchange, every durable queue and
    every dead-letter queue (idempotent). Returns (events exchange, dead-letter exchange)."""
    exchange = await channel.declare_exchange(
        topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dlx = await channel.declare_exchange(
        topology.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    for name in topology.dead_letter_queues:
        dlq = await channel.declare_queue(name, durable=True)
        await dlq.bind(dlx, routing_key=name)
    for spec in topology.durable_queues:
        await declare_queue(channel, spec, topology)
    return exchange, dlx


async def declare_queue(
    channel: AbstractChannel, spec: QueueSpec, topology: Topology
) -> AbstractQueue:
    """Declare one queue with its dead-lettering and bind it to the events exchange."""
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
