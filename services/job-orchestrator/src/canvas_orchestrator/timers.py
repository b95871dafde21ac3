"""Durable timers: due retries and expired attempt leases, kept in the ``jobs`` rows.

Every orchestrator polls; ``FOR UPDATE SKIP LOCKED`` hands each due job to exactly one
of them, which records the decision in the same transaction, the way every decision is
recorded (:mod:`canvas_orchestrator.committer`). A timer therefore
survives any restart: it is a row, not a sleeping task.

A row that cannot fire (its read model disagrees with its stream, or deciding on it
fails for a reason that is not the database being away) is logged and left out of the
polls for a while (SKIP_SECONDS): the timers due behind it fire all the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Final, Literal
from uuid import UUID, uuid4

import structlog

from canvas_events.broker import is_transient
from canvas_events.envelope import Envelope
from canvas_events.events import JobCancelRequested, parse_event
from canvas_events.logging import redact
from canvas_events.postgres import Database
from canvas_events.runtime import Background
from canvas_orchestrator import domain
from canvas_orchestrator.committer import CONFLICTS, Committer, Stream, Transaction
from canvas_orchestrator.dispatch import Dispatcher
from canvas_orchestrator.domain import Policy
from canvas_orchestrator.metrics import Metrics
from canvas_orchestrator.reporting import Handled, attempt_seconds, report
from canvas_store import cancels

log = structlog.get_logger("canvas_orchestrator.timers")

Kind = Literal["retry_due", "lease_expired"]

# Seconds a job whose timer cannot fire is left out of the polls before it is tried again.
SKIP_SECONDS: Final = 300.0

_DUE: Final[dict[Kind, str]] = {
    "retry_due": (
        "SELECT id FROM jobs WHERE status = 'retry_scheduled' AND next_attempt_at <= $1 "
        "AND id <> ALL($2::uuid[]) ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED"
    ),
    "lease_expired": (
        "SELECT id FROM jobs WHERE status IN ('queued', 'processing') "
        "AND lease_expires_at < $1 AND id <> ALL($2::uuid[]) "
        "ORDER BY lease_expires_at LIMIT 1 FOR UPDATE SKIP LOCKED"
    ),
}


@dataclass(eq=False)
class Timers(Background):
    """The polling loop that fires due retries and expired leases."""

    name = "timers"

    database: Database
    committer: Committer
    policy: Policy
    metrics: Metrics
    _: KW_ONLY
    new_id: Callable[[], UUID] = uuid4
    interval: float = 0.5
    max_per_tick: int = 200
    # Fair dispatch: a due retry is queued and left to the dispatcher (None: it is
    # dispatched at once, as before fair dispatch).
    dispatcher: Dispatcher | None = None

    def __post_init__(self) -> None:
        super().__init__()
        # Jobs whose timer could not fire, and until when (monotonic) they are left out.
        self._skipped: dict[UUID, float] = {}

    async def run(self) -> None:
        """Poll until stopped; a stop lets the timer in hand finish."""
        if not await self.unless_stopped(self.database.wait_ready()):
            return
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log.warning("timer poll failed; retrying", error=redact(repr(exc)))
            if not await self.pause(self.interval):
                return

    async def tick(self) -> int:
        """Fire every timer due now (up to ``max_per_tick`` of each kind); how many fired."""
        fired = 0
        for kind in ("retry_due", "lease_expired"):
            for _ in range(self.max_per_tick):
                if self.stopping.is_set():
                    return fired
                outcome = await self._fire_one(kind)
                if outcome is None:
                    break
                fired += outcome
        return fired

    async def _fire_one(self, kind: Kind) -> int | None:
        """Fire the oldest due timer of ``kind``: 1 when it fired, 0 when the job turned
        out not to be due after all (or could not fire), None when nothing is due."""
        job_id: UUID | None = None
        try:
            async with self.committer.transaction() as tx:
                job_id = await tx.conn.fetchval(_DUE[kind], tx.now, self._left_out())
                if job_id is None:
                    return None
                await tx.lock([job_id])  # locked already: its version, for the cache
                stream = (await tx.load([job_id]))[job_id]
                request = (await cancels.pending(tx.conn, [job_id])).get(job_id)
                if not self._decide(tx, stream, kind, request):
                    why = "read model says a timer is due but the stream disagrees"
                    self._skip(job_id, kind, f"{why}; run rebuild-projections")
                    return 0
                await cancels.clear(tx.conn, [job_id] if stream.state.is_final else [])
        except CONFLICTS as exc:
            # A message for the same job was recorded first; the next poll looks again.
            job = {"job_id": str(job_id)} if job_id is not None else {}
            log.info("timer lost a race; will look again", reason=type(exc).__name__, **job)
            return 0
        except Exception as exc:
            if job_id is None or is_transient(exc):
                raise  # the database is away: the whole poll waits for it
            self._skip(job_id, kind, "timer could not fire", error=redact(repr(exc)))
            return 0
        with structlog.contextvars.bound_contextvars(
            job_id=str(job_id), correlation_id=stream.staged[-1].correlation_id
        ):
            log.info("timer fired", kind=kind)
            if self.dispatcher is not None and stream.state.awaiting_dispatch:
                self.dispatcher.wake()
            self.metrics.timers.labels(kind).inc()
            seconds = attempt_seconds(stream.history, stream.recorded, tx.now)
            report(Handled("recorded", stream.recorded, attempt_seconds=seconds), self.metrics)
        return 1

    def _decide(
        self, tx: Transaction, stream: Stream, kind: Kind, request: Envelope | None
    ) -> bool:
        """Stage what the timer decides (a cancel requested meanwhile wins over a retry
        or a lease); False when it decides nothing."""
        if not stream.history:
            return False
        if request is not None and request.user_id != stream.owner:
            request = None  # someone else's: never applied
        if request is not None:
            event = parse_event(request)
            assert isinstance(event, JobCancelRequested)
            new = domain.cancel(stream.state, event)
        elif kind == "retry_due":
            new = domain.retry_due(
                stream.state,
                now=tx.now,
                policy=self.policy,
                new_id=self.new_id,
                dispatch_now=self.dispatcher is None,
            )
        else:
            new = domain.lease_expired(stream.state, now=tx.now, policy=self.policy)
        # The job's trace goes on from its last event (a timer has no message of its own).
        cause = request if request is not None else stream.history[-1].envelope
        tx.stage(stream, new, cause, stream.history[-1].traceparent)
        return bool(new)

    def _left_out(self) -> list[UUID]:
        """The jobs still left out of the polls."""
        now = time.monotonic()
        for job_id in [job_id for job_id, until in self._skipped.items() if until <= now]:
            del self._skipped[job_id]
        return list(self._skipped)

    def _skip(self, job_id: UUID, kind: Kind, why: str, **fields: str) -> None:
        """Leave ``job_id`` out of the polls for SKIP_SECONDS, so that it blocks no other
        timer; said once per skip."""
        self._skipped[job_id] = time.monotonic() + SKIP_SECONDS
        log.error(why, job_id=str(job_id), kind=kind, skipped_for_seconds=SKIP_SECONDS, **fields)
