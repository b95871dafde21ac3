"""Fair dispatch (docs/events.md, "Fair dispatch"): the orchestrator hands attempts to
the generators only as the fleet's capacity frees, and chooses whose job goes next
round robin across users, so that one user's burst does not make another user's single
job wait behind it.

A queued job first awaits dispatch (JobQueued alone; ``jobs.awaiting_dispatch``). The
dispatcher, every DISPATCH_INTERVAL_SECONDS (and at once when a job is queued in this
process), computes the room: the capacity the generators announced
(``POST /internal/generators/heartbeat``, seen in the last ANNOUNCED_SECONDS; with
none announced, DISPATCH_UNANNOUNCED_CAPACITY, so that work still reaches the queue and
the generators can be scaled up from zero) plus the headroom, less the attempts in
flight (dispatched, neither ended nor given up), and in any case the headroom less the
attempts dispatched and not started yet (:attr:`Fleet.free`). The headroom is
DISPATCH_HEADROOM, or DISPATCH_HEADROOM_FRACTION of the capacity when that is more. It
then appends GenerationRequested to that many waiting jobs, in fair order: the highest
priority first; within a priority, a user's k-th waiting job after every other user's
(k-1)-th, counting the attempts each user has in flight already; then the oldest first.
The events are recorded the way every decision is (:mod:`canvas_orchestrator.committer`),
in one transaction.

Every orchestrator runs a dispatcher; a transaction-scoped advisory lock lets one round
run at a time across the fleet (a round that does not get it does nothing), so nothing
is handed out twice and no lock outlives a frozen process.

The fast path keeps an idle system as quick as before: a new job that arrives while no
job awaits dispatch and the fleet has room is dispatched in the same transaction as its
JobQueued (:func:`fast_slots`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from datetime import datetime, timedelta
from typing import Final
from uuid import UUID, uuid4

import asyncpg
import structlog

from canvas_events.logging import redact
from canvas_events.postgres import Database
from canvas_events.runtime import Background
from canvas_orchestrator import domain
from canvas_orchestrator.committer import CONFLICTS, Committer, Stream, Transaction
from canvas_orchestrator.domain import Policy
from canvas_orchestrator.metrics import Metrics
from canvas_orchestrator.reporting import Handled, report

log = structlog.get_logger("canvas_orchestrator.dispatch")

DISPATCH_LOCK_KEY: Final = 0x63616E7661730005
# A generator counts towards the fleet's capacity this long after its last heartbeat.
ANNOUNCED_SECONDS: Final = 15.0
# Heartbeats older than this are deleted (a generator long gone).
FORGET_SECONDS: Final = 3_600.0

# One round trip: what the generators announced lately, the attempts in flight (a
# dispatched attempt has a lease until it ends or is given up: the jobs_lease index)
# and those of them no generator has started yet, and whether any job awaits dispatch
# (the jobs_awaiting_dispatch index: one entry read, whatever the backlog).
_FLEET: Final = """
SELECT
    (SELECT COALESCE(sum(capacity), 0) FROM generators WHERE seen_at > $1) AS announced,
    (SELECT count(*) FROM generators WHERE seen_at > $1) AS generators,
    (SELECT count(*) FROM jobs WHERE status IN ('queued', 'processing')
        AND lease_expires_at IS NOT NULL) AS in_flight,
    (SELECT count(*) FROM jobs WHERE status = 'queued'
        AND lease_expires_at IS NOT NULL) AS unstarted,
    EXISTS (SELECT 1 FROM jobs WHERE awaiting_dispatch) AS waiting
"""

# How many jobs await dispatch: the gauge's, read at most every WAITING_COUNT_SECONDS
# (it reads every waiting job's index entry: about 12 ms at 100,000).
_WAITING_COUNT: Final = "SELECT count(*) FROM jobs WHERE awaiting_dispatch"
WAITING_COUNT_SECONDS: Final = 1.0

# The jobs to dispatch next, in fair order (see the module docstring). A job beyond a
# user's first $1 waiting ones never makes the first $1 overall (each of those comes
# before it), so only those are read: the users with waiting jobs one probe each of the
# jobs_awaiting_dispatch_by_user index (a loose index scan), then each one's first $1.
_FAIR_ORDER: Final = """
WITH RECURSIVE users AS (
    (SELECT user_id FROM jobs WHERE awaiting_dispatch ORDER BY user_id LIMIT 1)
    UNION ALL
    SELECT (
        SELECT j.user_id FROM jobs AS j
        WHERE j.awaiting_dispatch AND j.user_id > users.user_id
        ORDER BY j.user_id LIMIT 1
    )
    FROM users WHERE users.user_id IS NOT NULL
), waiting AS (
    SELECT first.*,
           row_number() OVER (
               PARTITION BY first.user_id ORDER BY first.priority DESC, first.created_at, first.id
           ) AS n
    FROM users CROSS JOIN LATERAL (
        SELECT id, user_id, priority, created_at FROM jobs
        WHERE awaiting_dispatch AND user_id = users.user_id
        ORDER BY priority DESC, created_at, id
        LIMIT $1
    ) AS first
    WHERE users.user_id IS NOT NULL
), running AS (
    SELECT user_id, count(*) AS r FROM jobs
    WHERE status IN ('queued', 'processing') AND lease_expires_at IS NOT NULL
      AND user_id IN (SELECT user_id FROM waiting)
    GROUP BY user_id
)
SELECT w.id FROM waiting AS w LEFT JOIN running AS u ON u.user_id = w.user_id
ORDER BY w.priority DESC, COALESCE(u.r, 0) + w.n, w.created_at, w.id
LIMIT $1
"""


@dataclass(frozen=True)
class Fleet:
    """The fleet's capacity and load, as one round sees them."""

    capacity: int  # announced, or the unannounced fallback
    announced: bool  # some generator announced itself lately
    in_flight: int
    unstarted: int  # of in_flight: handed out, not started by a generator yet
    waiting: bool  # some job awaits dispatch
    headroom: int

    @property
    def free(self) -> int:
        """Attempts that may be handed out now: up to the capacity plus the headroom in
        flight, and in any case up to the headroom waiting to start.

        The second term keeps work ready for a slot that frees. An attempt counts as in
        flight until its end is recorded, which under load comes tens to hundreds of
        milliseconds after the generator freed its slot; by the first term alone those
        slots sat idle until then (a 1 s model at MAX_CONCURRENT_JOBS=100 completed 65
        jobs/s, not 100). What waits ahead of a late job is still at most the headroom:
        the attempts handed out and not started."""
        return max(
            0, self.capacity + self.headroom - self.in_flight, self.headroom - self.unstarted
        )


@dataclass(frozen=True)
class Limits:
    """DISPATCH_UNANNOUNCED_CAPACITY, DISPATCH_HEADROOM and DISPATCH_HEADROOM_FRACTION
    (the settings' defaults)."""

    unannounced_capacity: int = 100
    headroom: int = 5
    headroom_fraction: float = 0.2

    def headroom_for(self, capacity: int) -> int:
        """The headroom of a fleet of ``capacity``: DISPATCH_HEADROOM, or that fraction
        of the capacity when it is more. In time, what a late job waits behind is then
        about that fraction of one model call, whatever the fleet's size."""
        return max(self.headroom, math.ceil(capacity * self.headroom_fraction))


async def fleet(conn: asyncpg.Connection, now: datetime, limits: Limits) -> Fleet:
    """The fleet as the database says it is at ``now``."""
    row = await conn.fetchrow(_FLEET, now - timedelta(seconds=ANNOUNCED_SECONDS))
    assert row is not None
    announced = row["generators"] > 0
    capacity = int(row["announced"]) if announced else limits.unannounced_capacity
    return Fleet(
        capacity=capacity,
        announced=announced,
        in_flight=row["in_flight"],
        unstarted=row["unstarted"],
        waiting=bool(row["waiting"]),
        headroom=limits.headroom_for(capacity),
    )


async def fast_slots(tx: Transaction, limits: Limits) -> int:
    """How many new jobs this transaction may dispatch at once: none while any job
    awaits dispatch (it goes first), else the fleet's free room."""
    seen = await fleet(tx.conn, tx.now, limits)
    return 0 if seen.waiting else seen.free


async def heartbeat(
    conn: asyncpg.Connection, generator_id: str, capacity: int, running: int, now: datetime
) -> None:
    """Record what a generator announced, and forget generators long gone."""
    await conn.execute(
        "INSERT INTO generators (generator_id, capacity, running, seen_at) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (generator_id) DO UPDATE SET "
        "capacity = EXCLUDED.capacity, running = EXCLUDED.running, seen_at = EXCLUDED.seen_at",
        generator_id,
        capacity,
        running,
        now,
    )
    await conn.execute(
        "DELETE FROM generators WHERE seen_at < $1", now - timedelta(seconds=FORGET_SECONDS)
    )


@dataclass(eq=False)
class Dispatcher(Background):
    """Hands waiting jobs their attempts as the fleet's capacity frees."""

    name = "dispatcher"

    database: Database
    committer: Committer
    policy: Policy
    metrics: Metrics
    _: KW_ONLY
    limits: Limits = Limits()
    new_id: Callable[[], UUID] = uuid4
    interval: float = 0.1
    max_per_round: int = 200

    def __post_init__(self) -> None:
        super().__init__()
        self._wake = asyncio.Event()
        self._next_count_at = 0.0

    def wake(self) -> None:
        """A job was queued: look again now rather than at the next interval."""
        self._wake.set()

    def stopping_now(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Dispatch until stopped."""
        if not await self.unless_stopped(self.database.wait_ready()):
            return
        while not self.stopping.is_set():
            self._wake.clear()
            dispatched = 0
            try:
                dispatched = await self.round()
            except CONFLICTS as exc:
                log.info("dispatch lost a race; will look again", reason=type(exc).__name__)
            except Exception as exc:
                log.warning("dispatch round failed; retrying", error=redact(repr(exc)))
                await self.pause(1.0)
            if dispatched < self.max_per_round:
                # Woken by a queued job or a stop, else after the interval.
                await self._sleep()

    async def _sleep(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.interval)

    async def round(self) -> int:
        """One round: hand out as many attempts as the fleet has room for, in fair
        order; how many were handed out."""
        async with self.committer.transaction() as tx:
            if not await tx.conn.fetchval(
                "SELECT pg_try_advisory_xact_lock($1)", DISPATCH_LOCK_KEY
            ):
                return 0  # another orchestrator's round runs now
            seen = await fleet(tx.conn, tx.now, self.limits)
            await self._observe(tx.conn, seen)
            room = min(seen.free, self.max_per_round)
            if room <= 0 or not seen.waiting:
                return 0
            rows = await tx.conn.fetch(_FAIR_ORDER, room)
            job_ids = [row["id"] for row in rows]
            await tx.lock(sorted(job_ids))
            streams = await tx.load(job_ids)
            dispatched = [streams[job_id] for job_id in job_ids if self._stage(tx, streams[job_id])]
        self.metrics.dispatch_rounds.inc()
        for stream in dispatched:
            self._report(stream)
        return len(dispatched)

    def _stage(self, tx: Transaction, stream: Stream) -> bool:
        """Stage the attempt of one waiting job; False when it waits no more."""
        if not stream.history:
            return False
        new = domain.dispatch(stream.state, now=tx.now, policy=self.policy, new_id=self.new_id)
        # The job's trace goes on from its last event, as a timer's decision does.
        last = stream.history[-1]
        tx.stage(stream, new, last.envelope, last.traceparent)
        return bool(new)

    async def _observe(self, conn: asyncpg.Connection, seen: Fleet) -> None:
        """The fleet's gauges; the waiting jobs counted at most every
        WAITING_COUNT_SECONDS (0 at once when none waits)."""
        now = time.monotonic()
        if not seen.waiting:
            self.metrics.dispatch_waiting.set(0)
        elif now >= self._next_count_at:
            self._next_count_at = now + WAITING_COUNT_SECONDS
            self.metrics.dispatch_waiting.set(await conn.fetchval(_WAITING_COUNT))
        self.metrics.fleet_capacity.set(seen.capacity if seen.announced else 0)
        self.metrics.attempts_in_flight.set(seen.in_flight)

    def _report(self, stream: Stream) -> None:
        with structlog.contextvars.bound_contextvars(
            job_id=str(stream.job_id), correlation_id=stream.staged[-1].correlation_id
        ):
            report(Handled("recorded", stream.recorded), self.metrics)
