"""Durable timers: due retries and expired attempt leases, kept in the ``jobs`` rows.

Every orchestrator polls; ``FOR UPDATE SKIP LOCKED`` hands each due job to exactly one
of them, which records the decision in the same transaction. A timer therefore
survives any restart: it is a row, not a sleeping task.

A row that cannot fire (its read model disagrees with its stream, or deciding on it
fails for a reason that is not the database being away) is logged and left out of the
polls for a while (SKIP_SECONDS): the timers due behind it fire all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final, Literal
from uuid import UUID, uuid4

import structlog

from canvas_events.broker import is_transient
from canvas_events.envelope import utcnow
from canvas_events.logging import redact
from canvas_events.postgres import Database
from canvas_orchestrator import domain
from canvas_orchestrator.background import unless_stopped
from canvas_orchestrator.domain import Policy
from canvas_orchestrator.event_store import append, load
from canvas_orchestrator.handlers import (
    CONFLICTS,
    Clock,
    Handled,
    attempt_seconds,
    cancel_requests,
    report,
    state_of,
)
from canvas_orchestrator.metrics import Metrics
from canvas_orchestrator.projections import project

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


class Timers:
    """The polling loop that fires due retries and expired leases."""

    def __init__(
        self,
        database: Database,
        policy: Policy,
        metrics: Metrics,
        *,
        clock: Clock = utcnow,
        new_id: Callable[[], UUID] = uuid4,
        interval: float = 0.5,
        max_per_tick: int = 200,
    ) -> None:
        self._database = database
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._new_id = new_id
        self._interval = interval
        self._max_per_tick = max_per_tick
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Jobs whose timer could not fire, and until when (monotonic) they are left out.
        self._skipped: dict[UUID, float] = {}

    async def start(self) -> None:
        """Start polling in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="timers")

    async def stop(self, timeout: float = 10.0) -> None:
        """Finish the job in hand and stop."""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.warning("timers did not stop in time; cancelled")

    async def _run(self) -> None:
        if not await unless_stopped(self._database.wait_ready(), self._stopping):
            return
        while not self._stopping.is_set():
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("timer poll failed; retrying", error=redact(repr(exc)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    async def tick(self) -> int:
        """Fire every timer due now (up to ``max_per_tick`` of each kind); how many fired."""
        fired = 0
        for kind in ("retry_due", "lease_expired"):
            for _ in range(self._max_per_tick):
                if self._stopping.is_set():
                    return fired
                outcome = await self._fire_one(kind)
                if outcome is None:
                    break
                fired += outcome
        return fired

    async def _fire_one(self, kind: Kind) -> int | None:
        """Fire the oldest due timer of ``kind``: 1 when it fired, 0 when the job turned
        out not to be due after all (or could not fire), None when nothing is due."""
        now = self._clock()
        job_id: UUID | None = None
        async with self._database.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    job_id = await conn.fetchval(_DUE[kind], now, self._left_out())
                    if job_id is None:
                        return None
                    history = await load(conn, job_id)
                    state = state_of(history, job_id)
                    request = (await cancel_requests(conn, [job_id])).get(job_id)
                    if request is not None and (
                        not history or request.envelope.user_id != history[0].envelope.user_id
                    ):
                        request = None  # someone else's: never applied
                    if request is not None:
                        # A cancel requested meanwhile wins over a retry or a lease.
                        new = domain.cancel(state, request.event)
                        await conn.execute("DELETE FROM cancel_requests WHERE job_id = $1", job_id)
                    elif kind == "retry_due":
                        new = domain.retry_due(
                            state, now=now, policy=self._policy, new_id=self._new_id
                        )
                    else:
                        new = domain.lease_expired(state, now=now, policy=self._policy)
                    if not new or not history:
                        self._skip(
                            job_id,
                            kind,
                            "read model says a timer is due but the stream disagrees; "
                            "run rebuild-projections",
                        )
                        return 0
                    last = history[-1].envelope
                    cause = request.envelope if request is not None else last
                    envelopes = [
                        cause.follow(
                            event,
                            job_id=job_id,
                            user_id=last.user_id,
                            canvas_id=last.canvas_id,
                            occurred_at=cause.occurred_at
                            if event.type_name() == cause.type
                            else now,
                        )
                        for event in new
                    ]
                    recorded = await append(conn, job_id, state.version, envelopes)
                    await project(conn, recorded)
            except CONFLICTS as exc:
                # A message for the same job was recorded first; the next poll looks again.
                log.info("timer lost a race; will look again", reason=type(exc).__name__)
                return 0
            except Exception as exc:
                if job_id is None or is_transient(exc):
                    raise  # the database is away: the whole poll waits for it
                self._skip(job_id, kind, "timer could not fire", error=redact(repr(exc)))
                return 0
        with structlog.contextvars.bound_contextvars(
            job_id=str(job_id), correlation_id=last.correlation_id
        ):
            log.info("timer fired", kind=kind)
            self._metrics.timers.labels(kind).inc()
            report(
                Handled(
                    "recorded", recorded, attempt_seconds=attempt_seconds(history, recorded, now)
                ),
                self._metrics,
            )
        return 1

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
