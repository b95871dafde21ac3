"""The relay: publishes every recorded event, in position order, as ``job.<Type>`` with
the envelope's ``position`` set (the transactional outbox's second half); the events
that only the notifiers take, several to a ``job.Batch`` message where one read of the
store found several (docs/events.md, "Batches").

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
consumers dedupe. The checkpoint's writes do not wait for the WAL to reach the disk
(``synchronous_commit=off`` on the relay's session): a lone event's publish then costs no
fsync beside its transaction's, and a server crash that loses the last checkpoint moves
(at most a few wal_writer_delay's worth) only publishes those events again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final, TypeAlias

import asyncpg
import structlog

from canvas_events.broker import Broker
from canvas_events.events import GenerationRequested
from canvas_events.logging import redact
from canvas_events.runtime import Background
from canvas_events.topology import (
    BATCH,
    JOB,
    RELAYED_EVENT_TYPES,
    SOLO_EVENT_TYPES,
    routing_key,
)
from canvas_orchestrator.metrics import Metrics
from canvas_store.connections import connect
from canvas_store.events import (
    NOTIFY_CHANNEL,
    RecordedEvent,
    count_after,
    held_by_other_databases,
    read_settled_after,
)

log = structlog.get_logger("canvas_orchestrator.relay")

RELAY_LOCK_KEY: Final = 0x63616E7661730002
# The relay's session ends this long after its last query: a frozen relay's lock goes.
SESSION_SECONDS: Final = 10.0
# A relay that could publish nothing for this long hands the relay over.
BROKER_GRACE_SECONDS: Final = 10.0
# Events held back by an older transaction in flight: read again this soon (then twice
# as late each time, up to the poll interval). That transaction's commit settles them
# but may notify nobody (it appended nothing); service transactions last milliseconds.
HELD_BACK_SECONDS: Final = 0.005
# Reads in a row that found nothing settled while events waited (5, 10, 20 ms apart),
# after which the relay asks whether the oldest transaction in flight is another
# database's (canvas_store.events.held_by_other_databases: about a millisecond of the
# database's time). If so (one left open may last for hours, and cannot append here),
# reads leave other databases' transactions out for HERE_SECONDS (read_settled_after,
# ``here``, that millisecond again a read). If not, this database's own transaction
# holds it (those end in milliseconds): nothing changes.
STUCK_READS: Final = 3
HERE_SECONDS: Final = 10.0
# Shown in pg_stat_activity, so an operator can tell which session holds the relay lock.
APPLICATION_NAME: Final = "canvas-orchestrator-relay"
CHECKPOINT: Final = "job-events"


# The publishes started, in position order (None: an event no queue consumes).
InFlight: TypeAlias = deque[tuple[RecordedEvent, asyncio.Task[None] | None]]


@dataclass
class _Cursor:
    """Where an active relay is: confirmed up to ``checkpoint``, handed to the broker up
    to ``read``, with the publishes in between ``in_flight`` (in position order)."""

    checkpoint: int
    read: int
    # The store may hold events after ``read``.
    more: bool = True
    # Reads in a row that found committed events after ``read`` waiting for an older
    # transaction to end (canvas_store.events): read again soon, not after the poll
    # interval, backing off from HELD_BACK_SECONDS.
    held_back: int = 0
    # Of those, the last ones in a row that found nothing settled at all.
    stuck: int = 0
    # Until then, reads leave out other databases' transactions (monotonic clock).
    here_until: float = 0.0
    # Since when every publish failed (None: the last one went through).
    failing_since: float | None = None
    next_lag_at: float = 0.0
    in_flight: InFlight = field(default_factory=deque)

    @classmethod
    def at(cls, checkpoint: int) -> _Cursor:
        return cls(checkpoint=checkpoint, read=checkpoint)


@dataclass(eq=False)
class Relay(Background):
    """Publishes the event store to RabbitMQ while it holds the relay lock."""

    name = "relay"

    dsn: str
    broker: Broker
    metrics: Metrics
    _: KW_ONLY
    batch_size: int = 200
    poll_interval: float = 1.0
    checkpoint: str = CHECKPOINT
    schema_ready: Callable[[], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        super().__init__()
        self._wake = asyncio.Event()
        # A NOTIFY came (or a stop): read the store again.
        self._notified = False
        self.active = False

    def stopping_now(self) -> None:
        # A stop publishes what is recorded so far (within the stop's timeout), then
        # closes the connection, which releases the lock.
        self._notified = True
        self._wake.set()

    async def run(self) -> None:
        """Connect, wait for the lock, publish; again after any failure."""
        # relay_checkpoints exists once the service's pool has migrated the schema.
        if self.schema_ready is not None and not await self.unless_stopped(self.schema_ready()):
            return
        delay = 0.5
        while not self.stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(
                    self.dsn,
                    application_name=APPLICATION_NAME,
                    idle_session_seconds=max(SESSION_SECONDS, 5 * self.poll_interval),
                    # The checkpoint moves after every confirm: no fsync of its own.
                    wait_for_flush=False,
                )
                delay = 0.5
                await self._standby(conn)
                if not self.stopping.is_set():
                    await self._publish_loop(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("relay interrupted; retrying", error=redact(repr(exc)), retry_in=delay)
            finally:
                if self.active:
                    log.info("relay released")
                self.active = False
                self.metrics.relay_active.set(0)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)
            await self.pause(delay)
            delay = min(delay * 2, 5.0)

    async def _standby(self, conn: asyncpg.Connection) -> None:
        """Wait until this process holds the relay lock (or is asked to stop). Without a
        broker it could publish nothing: it leaves the lock to one that can."""
        while not self.stopping.is_set():
            if not self.broker.connected:
                await self._measure_lag(conn)  # also keeps the session from going idle
                with contextlib.suppress(TimeoutError):
                    await self.broker.wait_connected(self.poll_interval)
                continue
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY):
                self.active = True
                self.metrics.relay_active.set(1)
                log.info("relay active")
                return
            await self._measure_lag(conn)
            await self.pause(self.poll_interval)

    async def _publish_loop(self, conn: asyncpg.Connection) -> None:
        """Publish what is recorded, in position order, until asked to stop (then what
        is recorded by now: the consumer has drained its messages) or until the broker
        refused everything for BROKER_GRACE_SECONDS."""

        def on_notify(*_: Any) -> None:
            self._notified = True
            self._wake.set()

        await conn.add_listener(NOTIFY_CHANNEL, on_notify)
        cursor = _Cursor.at(await self._checkpoint_position(conn))
        try:
            while True:
                final = self.stopping.is_set()
                self._wake.clear()
                room = await self._fill(conn, cursor)
                failed = await self._settle(conn, cursor)
                if failed and self._failing_too_long(cursor):
                    return
                if time.monotonic() >= cursor.next_lag_at:
                    # A gauge scraped every few seconds: once a second is plenty, and a
                    # busy relay saves a query a batch.
                    cursor.next_lag_at = time.monotonic() + 1.0
                    await self._measure_lag(conn, cursor.checkpoint)
                if final and (failed or (not cursor.more and not cursor.in_flight)):
                    return
                if failed:
                    await self.pause(1.0)  # do not spin while the broker is away
                elif not cursor.more or room <= 0:
                    # Woken by a NOTIFY, a confirm, a stop, or the poll interval.
                    wait = next_read_in(cursor.held_back, self.poll_interval)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    cursor.more = cursor.more or not self._wake.is_set()  # a poll reads again
        finally:
            await _settled(cursor.in_flight)
            with contextlib.suppress(Exception):
                await conn.remove_listener(NOTIFY_CHANNEL, on_notify)

    async def _checkpoint_position(self, conn: asyncpg.Connection) -> int:
        """The position confirmed so far (0 for a new checkpoint)."""
        await conn.execute(
            "INSERT INTO relay_checkpoints (name, position) VALUES ($1, 0) "
            "ON CONFLICT (name) DO NOTHING",
            self.checkpoint,
        )
        position: int = await conn.fetchval(
            "SELECT position FROM relay_checkpoints WHERE name = $1", self.checkpoint
        )
        return position

    async def _fill(self, conn: asyncpg.Connection, cursor: _Cursor) -> int:
        """Start publishing what follows ``cursor.read``, as far as the window allows;
        the room the window had."""
        room = self.batch_size - len(cursor.in_flight)
        if room > 0 and (cursor.more or self._notified or cursor.held_back):
            self._notified = False
            if cursor.stuck >= STUCK_READS:
                cursor.stuck = 0
                if await held_by_other_databases(conn):
                    self._leave_other_databases_out(cursor)
            here = time.monotonic() < cursor.here_until
            batch, held_back = await read_settled_after(conn, cursor.read, room, here=here)
            cursor.held_back = cursor.held_back + 1 if held_back else 0
            cursor.stuck = cursor.stuck + 1 if held_back and not batch else 0
            for message in _messages(batch):
                task = self._start_publish(message)
                cursor.in_flight.extend((item, task) for item in message)
            if batch:
                cursor.read = batch[-1].position
            cursor.more = len(batch) == room
        return room

    def _leave_other_databases_out(self, cursor: _Cursor) -> None:
        """Another database's transaction held the relay back: leave those out for a
        while."""
        if time.monotonic() >= cursor.here_until:
            log.info(
                "relay held back by a transaction open in another database; reading past it",
                for_seconds=HERE_SECONDS,
                find_it="pg_stat_activity WHERE backend_xid IS NOT NULL ORDER BY xact_start",
            )
        cursor.here_until = time.monotonic() + HERE_SECONDS

    async def _settle(self, conn: asyncpg.Connection, cursor: _Cursor) -> bool:
        """Move the checkpoint past what the broker confirmed; True when a publish
        failed (what follows it is then published again, from the checkpoint on)."""
        confirmed, failed = self._settle_confirmed(cursor.in_flight)
        if confirmed is not None:
            cursor.failing_since = None
            cursor.checkpoint = confirmed.position
            await conn.execute(
                "UPDATE relay_checkpoints SET position = $2 WHERE name = $1 AND position < $2",
                self.checkpoint,
                cursor.checkpoint,
            )
        if failed:
            # Once what is still in flight has settled.
            await _settled(cursor.in_flight)
            cursor.in_flight.clear()
            cursor.read, cursor.more = cursor.checkpoint, True
            cursor.failing_since = cursor.failing_since or time.monotonic()
        return failed

    def _failing_too_long(self, cursor: _Cursor) -> bool:
        """Whether every publish failed for BROKER_GRACE_SECONDS: time to hand the relay
        over to a process whose broker works."""
        assert cursor.failing_since is not None
        failing = time.monotonic() - cursor.failing_since
        if failing < BROKER_GRACE_SECONDS:
            return False
        log.warning(
            "relay cannot publish; handing the relay over", failing_seconds=round(failing, 1)
        )
        return True

    def _start_publish(self, message: list[RecordedEvent]) -> asyncio.Task[None] | None:
        """Publish ``message`` (one event, or a batch of them) in the background if some
        queue consumes its events (None if not: they count as confirmed). Publishes
        started in order reach the channel in order (one channel, a FIFO lock)."""
        if message[0].envelope.type not in RELAYED_EVENT_TYPES:
            return None
        task = asyncio.create_task(self._publish(message))
        task.add_done_callback(lambda _: self._wake.set())
        return task

    def _settle_confirmed(self, in_flight: InFlight) -> tuple[RecordedEvent | None, bool]:
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
                        job_id=str(item.stream_id),
                        correlation_id=item.envelope.correlation_id,
                    )
                    return confirmed, True
                self.metrics.outbox_published.inc()
            in_flight.popleft()
            confirmed = item
        return confirmed, False

    async def _publish(self, message: list[RecordedEvent]) -> None:
        # Each event's publish span continues the trace of the message that recorded it.
        if len(message) > 1:
            # Status events for the notifiers, which may all be away.
            await self.broker.publish_envelopes(
                [item.envelope for item in message],
                routing_key(JOB, BATCH),
                parents=[item.traceparent for item in message],
                mandatory=False,
            )
            return
        envelope = message[0].envelope
        priority = None
        work = envelope.type == GenerationRequested.type_name()
        if work:
            # Generators take the highest priority first from their work queue.
            priority = int(envelope.data.get("priority", 0))
        # Work must reach the (durable) work queue; the other events go to per-process
        # queues of notifiers and generators, of which there may be none at the moment.
        await self.broker.publish(
            envelope,
            routing_key(JOB, envelope.type),
            priority=priority,
            mandatory=work,
            parent=message[0].traceparent,
        )

    async def _measure_lag(self, conn: asyncpg.Connection, checkpoint: int | None = None) -> None:
        if checkpoint is None:
            checkpoint = await conn.fetchval(
                "SELECT COALESCE((SELECT position FROM relay_checkpoints WHERE name = $1), 0)",
                self.checkpoint,
            )
        self.metrics.outbox_lag.set(await count_after(conn, checkpoint or 0))


def next_read_in(held_back: int, poll_interval: float) -> float:
    """How long an idle relay waits before it reads again, after ``held_back`` reads in a
    row found events waiting behind an older transaction: soon, then twice as late each
    time, never later than the poll interval (however long the hold lasts)."""
    if not held_back:
        return poll_interval
    doublings: int = min(held_back - 1, 16)
    return min(poll_interval, HELD_BACK_SECONDS * float(2**doublings))


def _messages(batch: list[RecordedEvent]) -> list[list[RecordedEvent]]:
    """``batch`` cut into messages, in order: the relayed events that only ``job.*``
    takes (the notifiers') go together, each of SOLO_EVENT_TYPES (the generators' work
    and cancels) and each event no queue takes goes alone."""
    messages: list[list[RecordedEvent]] = []
    run: list[RecordedEvent] = []
    for item in batch:
        kind = item.envelope.type
        if kind in RELAYED_EVENT_TYPES and kind not in SOLO_EVENT_TYPES:
            run.append(item)
            continue
        if run:
            messages.append(run)
            run = []
        messages.append([item])
    if run:
        messages.append(run)
    return messages


async def _settled(in_flight: InFlight) -> None:
    """Wait until every publish in ``in_flight`` has its confirm or its error (each is
    bounded by the broker's publish timeout); their errors are not this caller's."""
    tasks = {task for _, task in in_flight if task is not None}
    if tasks:
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()
