"""The fleet's model budget: how many calls (and tokens) every generator together may
send a model in any window of ``window_seconds`` (a minute), and the pauses a 429 with
``Retry-After`` asks of all of them.

A generator asks for a permit just before each model call (through the orchestrator's
internal API, which calls :func:`acquire`). A permit is a row of ``model_permits``:
granted while the calls granted in the last window are fewer than the limit and their
tokens leave room for the call's estimate; else the answer says how long until they
will. Each model's permits are granted one at a time (a transaction-level advisory
lock), so replicas never both take the last one. A sliding window, not a token bucket:
a bucket lets a full burst follow a full minute, which is twice the limit in some
window; here no window of ``window_seconds`` ever holds more than the limit.

A call's tokens are known only after it: the permit holds an estimate until the
generator reports the real usage (:func:`settle`). A call that fails keeps its
estimate, which is what a provider that counts failed calls would do too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final
from uuid import UUID

import asyncpg

# Permits are kept this many windows (older ones count for nothing), pruned as granted.
_KEPT_WINDOWS: Final = 2
# A wait not asked about again for this long is forgotten (generators ask every few
# seconds while they wait); the status answer shows only waits asked about lately.
STALE_WAIT: Final = timedelta(minutes=10)
# A permit asked for again within this long stands as granted.
FRESH: Final = timedelta(milliseconds=50)
# A call reaches the provider a little after its permit (the HTTP client, the network):
# each window is counted this much longer, so that the provider's own count of any
# window never passes the limit.
SLACK_SECONDS: Final = 1.0
SLACK_SHARE: Final = 0.02
# After a pause the fleet starts slowly: 1 call in its first second, 2 by the end of the
# next, 4, 8, ... for this many seconds; then only the limits count. A provider that is
# still overloaded answers one probe with a 429 (and a new pause), not a whole backlog.
RECOVERY_SECONDS: Final = 8
_LOCK_PREFIX: Final = "canvas-model-budget:"


@dataclass(frozen=True)
class Budget:
    """The fleet's limits for one model (None: no limit of that kind)."""

    requests: int | None = None
    tokens: int | None = None
    window_seconds: float = 60.0

    @property
    def window(self) -> timedelta:
        """The span each count covers: the window, and the slack for calls in transit."""
        seconds = self.window_seconds
        return timedelta(seconds=seconds + SLACK_SECONDS + SLACK_SHARE * seconds)

    @property
    def limited(self) -> bool:
        """Whether any limit is set."""
        return self.requests is not None or self.tokens is not None


@dataclass(frozen=True)
class Permit:
    """The answer to a generator: go ahead, or ask again in ``retry_in_seconds``."""

    granted: bool
    retry_in_seconds: float = 0.0
    # Why not: "paused" (a 429 asked the fleet to wait), "recovering" (the slow start
    # after a pause), "requests" or "tokens".
    reason: str | None = None
    # When the wait ends (the pause's end, or when enough of the window has passed).
    until: datetime | None = None


async def acquire(
    conn: asyncpg.Connection,
    model: str,
    budget: Budget,
    *,
    attempt_id: UUID,
    run_id: UUID,
    estimated_tokens: int,
) -> Permit:
    """A permit for one call of ``model`` by a run of an attempt, or how long to wait,
    inside the caller's transaction.

    Asking again for a run that holds a permit counts no second call: a permit granted
    within :data:`FRESH` stands; an older one is moved to now if the window still has
    room for it (else the answer is a wait). A generator asks once before it takes the
    attempt (however long that waits) and again just before the call, so that the
    window counts calls when they are sent, not when they were first allowed."""
    assert conn.is_in_transaction(), "permits need the caller's transaction"
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", _LOCK_PREFIX + model
    )
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    permit = await _decide(conn, model, budget, now, attempt_id, run_id, estimated_tokens)
    await _note_wait(conn, model, attempt_id, permit, now)
    return permit


async def _decide(
    conn: asyncpg.Connection,
    model: str,
    budget: Budget,
    now: datetime,
    attempt_id: UUID,
    run_id: UUID,
    estimated_tokens: int,
) -> Permit:
    held_at: datetime | None = await conn.fetchval(
        "SELECT granted_at FROM model_permits WHERE attempt_id = $1 AND run_id = $2",
        attempt_id,
        run_id,
    )
    if held_at is not None and now - held_at <= FRESH:
        return Permit(granted=True)
    paused = await _paused(conn, model, now)
    if paused is not None:
        return paused
    window = budget.window
    # The window's other permits (a permit asked for again is moved, not counted twice).
    rows = await conn.fetch(
        "SELECT granted_at, tokens FROM model_permits WHERE model = $1 AND granted_at > $2 "
        "AND NOT (attempt_id = $3 AND run_id = $4) ORDER BY granted_at",
        model,
        now - window,
        attempt_id,
        run_id,
    )
    refused = _refusal(rows, budget, estimated_tokens)
    if refused is not None:
        reason, oldest_to_leave = refused
        return _wait(now, oldest_to_leave + window, reason)
    await _grant(conn, model, attempt_id, run_id, now, estimated_tokens, window)
    return Permit(granted=True)


async def _grant(
    conn: asyncpg.Connection,
    model: str,
    attempt_id: UUID,
    run_id: UUID,
    now: datetime,
    estimated_tokens: int,
    window: timedelta,
) -> None:
    """Record the permit (or move the run's to now), and forget the long-gone ones."""
    await conn.execute(
        "INSERT INTO model_permits (model, attempt_id, run_id, granted_at, tokens) "
        "VALUES ($1, $2, $3, $4, $5) "
        "ON CONFLICT (attempt_id, run_id) DO UPDATE SET granted_at = EXCLUDED.granted_at",
        model,
        attempt_id,
        run_id,
        now,
        max(0, estimated_tokens),
    )
    await conn.execute(
        "DELETE FROM model_permits WHERE model = $1 AND granted_at < $2",
        model,
        now - window * _KEPT_WINDOWS,
    )


async def _note_wait(
    conn: asyncpg.Connection, model: str, attempt_id: UUID, permit: Permit, now: datetime
) -> None:
    """Keep ``model_waits`` true: the attempt waits (and why), or no longer does."""
    if permit.granted:
        await conn.execute("DELETE FROM model_waits WHERE attempt_id = $1", attempt_id)
        return
    await conn.execute(
        "INSERT INTO model_waits (attempt_id, model, reason, asked_at) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (attempt_id) DO UPDATE SET reason = EXCLUDED.reason, "
        "asked_at = EXCLUDED.asked_at",
        attempt_id,
        model,
        permit.reason or "",
        now,
    )
    # Waits nobody asked about for long (the generator stopped, the job moved on).
    await conn.execute(
        "DELETE FROM model_waits WHERE model = $1 AND asked_at < $2",
        model,
        now - STALE_WAIT,
    )


async def _paused(conn: asyncpg.Connection, model: str, now: datetime) -> Permit | None:
    """The wait a pause of ``model`` (or the slow start after it) asks for; None when it
    asks for none."""
    paused_until: datetime | None = await conn.fetchval(
        "SELECT paused_until FROM model_pauses WHERE model = $1", model
    )
    if paused_until is None:
        return None
    if paused_until > now:
        return _wait(now, paused_until, "paused")
    second = int((now - paused_until).total_seconds())
    if second >= RECOVERY_SECONDS:
        return None
    since: int = await conn.fetchval(
        "SELECT count(*) FROM model_permits WHERE model = $1 AND granted_at >= $2",
        model,
        paused_until,
    )
    if since < 2**second:
        return None
    return _wait(now, paused_until + timedelta(seconds=second + 1), "recovering")


def _refusal(
    rows: list[asyncpg.Record], budget: Budget, estimated_tokens: int
) -> tuple[str, datetime] | None:
    """Why a call cannot be granted now, and which permit must leave the window first;
    None when it can. ``rows``: the window's permits, oldest first."""
    if budget.requests is not None and len(rows) >= budget.requests:
        # Once the oldest len - limit + 1 have left, one more fits.
        return "requests", rows[len(rows) - budget.requests]["granted_at"]
    if budget.tokens is not None and rows:
        used = sum(row["tokens"] for row in rows)
        # A call larger than the whole budget goes alone, into an empty window.
        needed = min(estimated_tokens, budget.tokens)
        if used + needed <= budget.tokens:
            return None
        # The oldest permits leave the window first: once the one that makes room has.
        for row in rows:
            used -= row["tokens"]
            if used + needed <= budget.tokens:
                return "tokens", row["granted_at"]
    return None


def _wait(now: datetime, until: datetime, reason: str) -> Permit:
    seconds = max(0.0, (until - now).total_seconds())
    return Permit(granted=False, retry_in_seconds=round(seconds, 3), reason=reason, until=until)


async def settle(
    conn: asyncpg.Connection | asyncpg.Pool, *, attempt_id: UUID, run_id: UUID, tokens: int
) -> bool:
    """The call of this run used ``tokens``: its permit counts them from now on. False
    when there is no such permit (never granted, or pruned)."""
    status: str = await conn.execute(
        "UPDATE model_permits SET tokens = $3 WHERE attempt_id = $1 AND run_id = $2",
        attempt_id,
        run_id,
        max(0, tokens),
    )
    return status.endswith(" 1")


async def pause(conn: asyncpg.Connection | asyncpg.Pool, model: str, seconds: float) -> datetime:
    """Stop granting permits for ``model`` for ``seconds`` from now (a longer pause
    already set stays); when the pause ends."""
    until: datetime = await conn.fetchval(
        "INSERT INTO model_pauses (model, paused_until) "
        "VALUES ($1, clock_timestamp() + make_interval(secs => $2)) "
        "ON CONFLICT (model) DO UPDATE "
        "SET paused_until = GREATEST(model_pauses.paused_until, EXCLUDED.paused_until) "
        "RETURNING paused_until",
        model,
        seconds,
    )
    return until
