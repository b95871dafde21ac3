"""The relay: publishes every recorded event, in position order, as ``job.<Type>`` with
the envelope's ``position`` set (the transactional outbox's second half).

Exactly one relay publishes at a time across all orchestrators: it holds a session
advisory lock on a connection of its own, and the others wait on standby and take over
when that connection goes. The lock is a lease the relay keeps renewing: it queries at
least every poll interval, and the database ends its session once it has been idle for
SESSION_SECONDS (``idle_session_timeout``), so a relay that froze (SIGSTOP, a paused VM,
a partition) loses the lock within seconds; so does one that cannot reach the broker,
which gives the relay up after BROKER_GRACE_SECONDS of failed publishes, and stands by
again only with a broker connection. It wakes on the NOTIFY of each append, and polls
besides in case a notification is lost. What it reads goes to the broker at once, without waiting
for the confirms of what went before (up to ``batch_size`` unconfirmed, on one channel,
which keeps the order), and the checkpoint moves past the longest confirmed prefix: a
new event never waits behind the broker's disk. Delivery is at-least-once: after a
crash or a refused publish, the events after the checkpoint are published again, and
consumers dedupe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
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

log = structlog.get_logger("canvas_orchestrator.relay")

RELAY_LOCK_KEY: Final = 0x63616E7661730002
# The relay's session ends this long after its last query: a frozen relay's lock goes.
SESSION_SECONDS: Final = 10.0
# A relay that could publish nothing for this long hands the relay over.
BROKER_GRACE_SECONDS: Final = 10.0
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
        # A NOTIFY came (or a stop): read the store again.
        self._notified = False
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
        self._notified = True
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
                conn = await connect(
                    self._dsn,
                    application_name=APPLICATION_NAME,
                    idle_session_seconds=max(SESSION_SECONDS, 5 * self._poll_interval),
                )
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
        """Wait until this process holds the relay lock (or is asked to stop). Without a
        broker it could publish nothing: it leaves the lock to one that can."""
        while not self._stopping.is_set():
            if not self._broker.connected:
                await self._measure_lag(conn)  # also keeps the session from going idle
                with contextlib.suppress(TimeoutError):
                    await self._broker.wait_connected(self._poll_interval)
                continue
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY):
                self.active = True
                self._metrics.relay_active.set(1)
                log.info("relay active")
                return
            await self._measure_lag(conn)
            await self._sleep(self._poll_interval)

    async def _publish_loop(self, conn: asyncpg.Connection) -> None:
        def on_notify(*_: Any) -> None:
            self._notified = True
            self._wake.set()

        await conn.add_listener(NOTIFY_CHANNEL, on_notify)
        in_flight: deque[tuple[RecordedEvent, asyncio.Task[None] | None]] = deque()
        try:
            await conn.execute(
                "INSERT INTO relay_checkpoints (name, position) VALUES ($1, 0) "
                "ON CONFLICT (name) DO NOTHING",
                self._checkpoint,
            )
            checkpoint: int = await conn.fetchval(
                "SELECT position FROM relay_checkpoints WHERE name = $1", self._checkpoint
            )
            # Handed to the broker up to here; confirmed up to ``checkpoint``.
            read = checkpoint
            more = True  # the store may hold events after ``read``
            next_lag_at = 0.0
            # Since when every publish failed (None: the last one went through).
            failing_since: float | None = None
            while True:
                # Asked to stop: publish what is recorded by now (the consumer has drained
                # its messages), then give the lock up.
                final = self._stopping.is_set()
                self._wake.clear()
                room = self._batch_size - len(in_flight)
                if room > 0 and (more or self._notified):
                    self._notified = False
                    batch = await read_after(conn, read, room)
                    for item in batch:
                        in_flight.append((item, self._start_publish(item)))
                    if batch:
                        read = batch[-1].position
                    more = len(batch) == room
                confirmed, failed = self._settle_confirmed(in_flight)
                if confirmed is not None:
                    failing_since = None
                    checkpoint = confirmed.position
                    await conn.execute(
                        "UPDATE relay_checkpoints SET position = $2 "
                        "WHERE name = $1 AND position < $2",
                        self._checkpoint,
                        checkpoint,
                    )
                if failed:
                    # What follows the refused event goes out again, from the checkpoint
                    # on, once what is still in flight has settled.
                    await _settled(in_flight)
                    in_flight.clear()
                    read, more = checkpoint, True
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since >= BROKER_GRACE_SECONDS:
                        log.warning(
                            "relay cannot publish; handing the relay over",
                            failing_seconds=round(time.monotonic() - failing_since, 1),
                        )
                        return
                if time.monotonic() >= next_lag_at:
                    # A gauge scraped every few seconds: once a second is plenty, and a
                    # busy relay saves a query a batch.
                    next_lag_at = time.monotonic() + 1.0
                    await self._measure_lag(conn, checkpoint)
                if final and (failed or (not more and not in_flight)):
                    return
                if failed:
                    await self._sleep(1.0)  # do not spin while the broker is away
                elif not more or room <= 0:
                    # Woken by a NOTIFY, a confirm, a stop, or the poll interval.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll_interval)
                    more = more or not self._wake.is_set()  # a poll reads again
        finally:
            await _settled(in_flight)
            with contextlib.suppress(Exception):
                await conn.remove_listener(NOTIFY_CHANNEL, on_notify)

    def _start_publish(self, item: RecordedEvent) -> asyncio.Task[None] | None:
        """Publish ``item`` in the background if some queue consumes its type (None if
        not: it counts as confirmed). Publishes started in order reach the channel in
        order (one channel, a FIFO lock)."""
        if item.envelope.type not in RELAYED_EVENT_TYPES:
            return None
        task = asyncio.create_task(self._publish_one(item))
        task.add_done_callback(lambda _: self._wake.set())
        return task

    def _settle_confirmed(
        self, in_flight: deque[tuple[RecordedEvent, asyncio.Task[None] | None]]
    ) -> tuple[RecordedEvent | None, bool]:
        """Drop the confirmed prefix of ``in_flight``; return its last event, and whether
        the publish after it failed."""
        confirmed: RecordedEvent | None = None
        while in_flight:
            item, task = in_flight[0]
            if task is not None:
                if not task.done():
                    break
                error = task.exception()
                if error is not None:
                    log.warning(
                        "relay publish failed; will publish again",
                        error=redact(str(error)),
                        position=item.position,
                    )
                    return confirmed, True
                self._metrics.outbox_published.inc()
            in_flight.popleft()
            confirmed = item
        return confirmed, False

    async def _publish_one(self, item: RecordedEvent) -> None:
        envelope = item.envelope
        priority = None
        work = envelope.type == GenerationRequested.type_name()
        if work:
            # Generators take the highest priority first from their work queue.
            priority = int(envelope.data.get("priority", 0))
        # Work must reach the (durable) work queue; the other events go to per-process
        # queues of notifiers and generators, of which there may be none at the moment.
        await self._broker.publish(
            envelope, routing_key(JOB, envelope.type), priority=priority, mandatory=work
        )

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


async def _settled(in_flight: deque[tuple[RecordedEvent, asyncio.Task[None] | None]]) -> None:
    """Wait until every publish in ``in_flight`` has its confirm or its error (each is
    bounded by the broker's publish timeout); their errors are not this caller's."""
    tasks = {task for _, task in in_flight if task is not None}
    if tasks:
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()
