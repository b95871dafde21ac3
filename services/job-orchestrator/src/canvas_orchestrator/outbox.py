"""The relay: publishes every recorded event, in position order, as ``job.<Type>`` with
the envelope's ``position`` set (the transactional outbox's second half).

Exactly one relay publishes at a time across all orchestrators: it holds a session
advisory lock on a connection of its own, and the others wait on standby and take over
when that connection goes. It wakes on the NOTIFY of each append, and polls besides in
case a notification is lost. A batch is published concurrently on the confirming
channel (one channel keeps the order), and the checkpoint moves past the longest
confirmed prefix. Delivery is at-least-once: after a crash between publish and
checkpoint the next relay publishes some events again, and consumers dedupe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
import structlog

from canvas_events.broker import Broker
from canvas_events.events import GenerationRequested
from canvas_events.logging import redact
from canvas_events.topology import JOB, RELAYED_EVENT_TYPES, routing_key
from canvas_orchestrator.background import unless_stopped
from canvas_orchestrator.db import connect
from canvas_orchestrator.event_store import NOTIFY_CHANNEL, RecordedEvent, read_after
from canvas_orchestrator.metrics import Metrics

log = structlog.get_logger("canvas_orchestrator.outbox")

RELAY_LOCK_KEY: Final = 0x63616E7661730002
# Shown in pg_stat_activity, so an operator can tell which session holds the relay lock.
APPLICATION_NAME: Final = "canvas-orchestrator-relay"
CHECKPOINT: Final = "job-events"


class Relay:
    """Publishes the event store to RabbitMQ while it holds the relay lock."""

    def __init__(
        self,
        dsn: str,
        broker: Broker,
        metrics: Metrics,
        *,
        batch_size: int = 200,
        poll_interval: float = 1.0,
        checkpoint: str = CHECKPOINT,
        schema_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._dsn = dsn
        self._broker = broker
        self._metrics = metrics
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._checkpoint = checkpoint
        self._schema_ready = schema_ready
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.active = False

    async def start(self) -> None:
        """Start in the background: connect, wait for the lock, publish."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="relay")

    async def stop(self, timeout: float = 10.0) -> None:
        """Publish what is recorded so far (within ``timeout``), then close the
        connection, which releases the lock."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.warning("relay did not stop in time; cancelled")

    async def _run(self) -> None:
        # relay_checkpoints exists once the service's pool has migrated the schema.
        if self._schema_ready is not None and not await unless_stopped(
            self._schema_ready(), self._stopping
        ):
            return
        delay = 0.5
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self._dsn, application_name=APPLICATION_NAME)
                delay = 0.5
                await self._standby(conn)
                if not self._stopping.is_set():
                    await self._publish_loop(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("relay interrupted; retrying", error=redact(repr(exc)), retry_in=delay)
            finally:
                if self.active:
                    log.info("relay released")
                self.active = False
                self._metrics.relay_active.set(0)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)
            await self._sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _standby(self, conn: asyncpg.Connection) -> None:
        """Wait until this process holds the relay lock (or is asked to stop)."""
        while not self._stopping.is_set():
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY):
                self.active = True
                self._metrics.relay_active.set(1)
                log.info("relay active")
                return
            await self._measure_lag(conn)
            await self._sleep(self._poll_interval)

    async def _publish_loop(self, conn: asyncpg.Connection) -> None:
        def on_notify(*_: Any) -> None:
            self._wake.set()

        await conn.add_listener(NOTIFY_CHANNEL, on_notify)
        try:
            await conn.execute(
                "INSERT INTO relay_checkpoints (name, position) VALUES ($1, 0) "
                "ON CONFLICT (name) DO NOTHING",
                self._checkpoint,
            )
            checkpoint: int = await conn.fetchval(
                "SELECT position FROM relay_checkpoints WHERE name = $1", self._checkpoint
            )
            while True:
                # Asked to stop: publish what is recorded by now (the consumer has drained
                # its messages), then give the lock up.
                final = self._stopping.is_set()
                self._wake.clear()
                batch = await read_after(conn, checkpoint, self._batch_size)
                published: list[RecordedEvent] = []
                if batch:
                    published = await self._publish(batch)
                    if published:
                        checkpoint = published[-1].position
                        await conn.execute(
                            "UPDATE relay_checkpoints SET position = $2 "
                            "WHERE name = $1 AND position < $2",
                            self._checkpoint,
                            checkpoint,
                        )
                await self._measure_lag(conn, checkpoint)
                broker_away = len(published) < len(batch)
                caught_up = len(batch) < self._batch_size
                if final and (broker_away or caught_up):
                    return
                if broker_away:
                    await self._sleep(1.0)  # do not spin while the broker is away
                elif caught_up:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll_interval)
        finally:
            with contextlib.suppress(Exception):
                await conn.remove_listener(NOTIFY_CHANNEL, on_notify)

    async def _publish(self, batch: list[RecordedEvent]) -> list[RecordedEvent]:
        """Publish ``batch`` (the types some queue consumes); return its longest prefix
        that the broker confirmed."""
        results = await asyncio.gather(
            *(
                self._publish_one(item)
                for item in batch
                if item.envelope.type in RELAYED_EVENT_TYPES
            ),
            return_exceptions=True,
        )
        outcomes = iter(results)
        confirmed = 0
        for item in batch:
            if item.envelope.type in RELAYED_EVENT_TYPES:
                result = next(outcomes)
                if isinstance(result, BaseException):
                    log.warning(
                        "relay publish failed; will publish again",
                        error=redact(str(result)),
                        position=item.position,
                    )
                    break
                self._metrics.outbox_published.inc()
            confirmed += 1
        return batch[:confirmed]

    async def _publish_one(self, item: RecordedEvent) -> None:
        envelope = item.envelope
        priority = None
        if envelope.type == GenerationRequested.type_name():
            # Generators take the highest priority first from their work queue.
            priority = int(envelope.data.get("priority", 0))
        await self._broker.publish(envelope, routing_key(JOB, envelope.type), priority=priority)

    async def _measure_lag(self, conn: asyncpg.Connection, checkpoint: int | None = None) -> None:
        lag = await conn.fetchval(
            "SELECT COALESCE((SELECT max(position) FROM events), 0) "
            "- COALESCE($2::bigint, (SELECT position FROM relay_checkpoints WHERE name = $1), 0)",
            self._checkpoint,
            checkpoint,
        )
        self._metrics.outbox_lag.set(max(0, lag))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
