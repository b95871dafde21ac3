"""The gateway's ledger, ``gateway_job_requests``: the job requests it accepted.

It exists for what the orchestrator's read models cannot do in the instant between the
broker's confirm and the orchestrator's projection:

- read-your-writes: right after a 202, the status of a job the orchestrator has not
  projected yet is answered from the ledger row (``queued``), never 404
  (:mod:`canvas_store.views`);
- idempotency: ``UNIQUE (user_id, idempotency_key)``, and a job id derived from them,
  give a retried request the same job and no second one;
- the per-user limit: it counts the requests confirmed (or still being published) but
  not yet projected, so a burst cannot slip past the limit; the per-user daily token
  budget is checked in the same statement (:mod:`canvas_store.usage`);
- the last line of defence: a confirmed request the orchestrator has not recorded a
  while later (its message purged, dead-lettered or lost with a deleted queue) is sent
  again, and given up with a reason after a few tries (the gateway's ledger sweep).

A row is inserted before the publish and gets ``confirmed_at`` once the broker
confirmed it; only confirmed rows are ever shown. ``recorded_at`` marks the rows whose
job the orchestrator has recorded (the sweep looks at each row only until then);
``given_up_at`` and ``error_message`` a request given up. Rows whose job was recorded
(or given up, or never confirmed) are pruned after a day by the orchestrator's
retention; a keyed request retried after that is answered from the job itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import asyncpg

from canvas_events.envelope import Envelope
from canvas_events.events import JobRequested
from canvas_store.errors import BudgetSpent, CanvasTaken, LimitReached
from canvas_store.jobs import canvas_owner
from canvas_store.status import ACTIVE_STATUSES
from canvas_store.usage import TokenBudget, tokens_query

GIVEN_UP_ERROR: Final = (
    "the job was never recorded by the job-orchestrator ({tries} tries); submit it again"
)

# A ledger row, and the same shape made of a recorded job (its ledger row pruned).
_REQUEST_COLUMNS: Final = (
    "job_id, user_id, canvas_id, priority, query, options, idempotency_key, created_at, "
    "confirmed_at, correlation_id, resends, given_up_at, retry_of"
)
_RECORDED_REQUEST_COLUMNS: Final = (
    "id, user_id, canvas_id, priority, query, options, idempotency_key, created_at, "
    "created_at, '', 0, NULL::timestamptz, retry_of"
)
UNPROJECTED: Final = "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = r.job_id)"
# A user's unfinished jobs: recorded ones (the jobs_user_active index: written out, the
# statuses match its predicate), and requests confirmed or still being published that the
# orchestrator has not recorded (the ledger's partial index on unrecorded rows). Neither
# part touches a job that ended, however many the user has.
_ACTIVE_JOBS: Final = f"""
SELECT (SELECT count(*) FROM jobs
         WHERE user_id = $1
           AND status IN ({", ".join(sorted(f"'{status.value}'" for status in ACTIVE_STATUSES))}))
     + (SELECT count(*) FROM gateway_job_requests r
         WHERE r.user_id = $1 AND r.recorded_at IS NULL AND r.given_up_at IS NULL
           AND (r.confirmed_at IS NOT NULL
                OR r.created_at > now() - make_interval(secs => $2))
           AND {UNPROJECTED}) AS active
"""  # noqa: S608 (constants only)
# The tokens the user's jobs completed in the budget's day used ($12 to $13), when there
# is a budget ($11); NULL without one (no sum at all).
_SPENT: Final = f"""
SELECT CASE WHEN $11::bigint IS NOT NULL THEN ({tokens_query("$1", "$12", "$13")}) END
       AS tokens
"""
# The request inserted created now, in the same round trip as the count and the sum,
# unless the user is at the limit ($10) or has used the budget ($11), or its job id is
# in the ledger already; ``active`` and ``tokens`` either way. $14: the job it retries.
_ADMIT: Final = f"""
WITH counted AS ({_ACTIVE_JOBS}), spent AS ({_SPENT}), inserted AS (
    INSERT INTO gateway_job_requests (job_id, user_id, canvas_id, priority, query,
                                      options, idempotency_key, correlation_id,
                                      retry_of, created_at)
    SELECT $3::uuid, $1::text, $4::text, $5::smallint, $6::text, $7::jsonb, $8::text,
           $9::text, $14::uuid, now()
    WHERE (SELECT active FROM counted) < $10
      AND ($11::bigint IS NULL OR (SELECT tokens FROM spent) < $11::bigint)
    ON CONFLICT DO NOTHING
    RETURNING *
)
SELECT (SELECT active FROM counted) AS active, (SELECT tokens FROM spent) AS tokens,
       inserted.*
FROM (SELECT 1) AS one LEFT JOIN inserted ON true
"""  # noqa: S608 (constants only)
# Statements are built from these constants only (hence the noqa: S608); values are
# always bound parameters.


@dataclass(frozen=True)
class JobRequest:
    """One ledger row: a request the gateway accepted (or is accepting)."""

    job_id: UUID
    user_id: str
    canvas_id: str
    priority: int
    query: str
    options: dict[str, Any]
    idempotency_key: str | None
    created_at: datetime
    confirmed_at: datetime | None
    correlation_id: str = ""
    resends: int = 0
    given_up_at: datetime | None = None
    # The final job this request runs again (POST .../retry).
    retry_of: UUID | None = None

    def requested(self, correlation_id: str | None = None) -> Envelope:
        """The JobRequested message of this request (the job's created_at everywhere),
        in ``correlation_id``'s trace, or the request's own."""
        return Envelope.wrap(
            JobRequested(
                query=self.query,
                canvas_id=self.canvas_id,
                priority=self.priority,
                options=self.options,
                idempotency_key=self.idempotency_key,
                retry_of=self.retry_of,
            ),
            correlation_id=correlation_id or self.correlation_id,
            job_id=self.job_id,
            user_id=self.user_id,
            canvas_id=self.canvas_id,
            occurred_at=self.created_at,
        )


@dataclass(frozen=True)
class Admission:
    """The ledger row a request is answered with; ``duplicate`` when an earlier request
    with the same idempotency key made it."""

    request: JobRequest
    duplicate: bool


@dataclass(frozen=True)
class Limits:
    """What :func:`admit` enforces: ``active`` unfinished jobs a user may have; requests
    inserted less than ``in_flight_seconds`` ago and not confirmed yet (still being
    published) count towards it, so that a burst cannot pass it. And the user's token
    ``budget`` of the day, when there is one (None: no limit). Jobs accepted but not
    completed use tokens the budget does not know of yet: they can take a user past it,
    by what they use; the next request is then refused."""

    active: int
    in_flight_seconds: float
    budget: TokenBudget | None = None


async def admit(
    conn: asyncpg.Connection,
    request: JobRequest,
    *,
    canvas_given: bool,
    limits: Limits,
) -> Admission:
    """Record ``request`` (its ``created_at`` and ``confirmed_at`` are set here), or find
    the earlier one with the same key, inside the caller's transaction.

    Raises :class:`CanvasTaken` when a given canvas is someone else's,
    :class:`BudgetSpent` when the user's jobs used ``limits.budget`` today, and
    :class:`LimitReached` when the user already has ``limits.active`` unfinished jobs.
    A request with a known key is answered with its job whatever the limits say: it
    makes no new job.
    """
    assert conn.is_in_transaction(), "admit needs the caller's transaction"
    # One user's submissions go one at a time: the limit check and the key lookup then
    # see every earlier insert.
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('canvas-gateway:user:' || $1, 0))",
        request.user_id,
    )
    if request.idempotency_key is not None:
        earlier = await _keyed(conn, request)
        if earlier is not None:
            return Admission(earlier, duplicate=True)
    if canvas_given and await _canvas_taken(conn, request.canvas_id, request.user_id):
        raise CanvasTaken(request.canvas_id)
    row = await conn.fetchrow(
        _ADMIT,
        request.user_id,
        limits.in_flight_seconds,
        request.job_id,
        request.canvas_id,
        request.priority,
        request.query,
        request.options,
        request.idempotency_key,
        request.correlation_id,
        limits.active,
        *_budget_parameters(limits.budget),
        request.retry_of,
    )
    assert row is not None
    budget = limits.budget
    if budget is not None and row["tokens"] >= budget.tokens:
        raise BudgetSpent(row["tokens"], budget.tokens, budget.day.end)
    if row["active"] >= limits.active:
        raise LimitReached(row["active"], limits.active)
    if row["job_id"] is None:  # the same key, inserted before the lock was taken
        row = await conn.fetchrow(
            "SELECT * FROM gateway_job_requests WHERE job_id = $1", request.job_id
        )
        # Job ids of keyed requests are the user's own (derived from user and key).
        assert row is not None
        assert row["user_id"] == request.user_id
        return Admission(_request(row), duplicate=True)
    return Admission(_request(row), duplicate=False)


def _budget_parameters(
    budget: TokenBudget | None,
) -> tuple[int | None, datetime | None, datetime | None]:
    """$11 to $13 of :data:`_ADMIT`: the budget's tokens and day, or NULLs."""
    if budget is None:
        return None, None, None
    return budget.tokens, budget.day.start, budget.day.end


async def _keyed(conn: asyncpg.Connection, request: JobRequest) -> JobRequest | None:
    """The earlier request with ``request``'s key: its ledger row or, once that row was
    pruned (its job long recorded), the job itself; the same answer either way."""
    row = await conn.fetchrow(
        f"""
        SELECT {_REQUEST_COLUMNS} FROM gateway_job_requests
         WHERE user_id = $1 AND idempotency_key = $2
        UNION ALL
        SELECT {_RECORDED_REQUEST_COLUMNS} FROM jobs
         WHERE id = $3 AND user_id = $1
        LIMIT 1
        """,  # noqa: S608
        request.user_id,
        request.idempotency_key,
        request.job_id,
    )
    return _request(row) if row is not None else None


async def _canvas_taken(conn: asyncpg.Connection, canvas_id: str, user_id: str) -> bool:
    """Whether another user drew on the canvas, or has a confirmed request for it."""
    owner = await canvas_owner(conn, canvas_id)
    if owner is not None:
        return owner != user_id
    other = await conn.fetchval(
        "SELECT 1 FROM gateway_job_requests WHERE canvas_id = $1 AND user_id <> $2 "
        "AND confirmed_at IS NOT NULL LIMIT 1",
        canvas_id,
        user_id,
    )
    return other is not None


async def confirm(conn: asyncpg.Connection | asyncpg.Pool, job_ids: list[UUID]) -> None:
    """The broker confirmed these JobRequested messages: the rows may now be shown."""
    await conn.execute(
        "UPDATE gateway_job_requests SET confirmed_at = now() "
        "WHERE job_id = ANY($1::uuid[]) AND confirmed_at IS NULL",
        job_ids,
    )


async def discard(conn: asyncpg.Connection | asyncpg.Pool, job_id: UUID) -> None:
    """Forget a request whose publish failed (never confirmed, so never shown)."""
    await conn.execute(
        "DELETE FROM gateway_job_requests WHERE job_id = $1 AND confirmed_at IS NULL", job_id
    )


_CLAIM: Final = f"""
WITH due AS (
    SELECT r.job_id FROM gateway_job_requests r
    WHERE r.recorded_at IS NULL AND r.given_up_at IS NULL
      AND r.confirmed_at IS NOT NULL AND {UNPROJECTED}
      AND COALESCE(r.last_sent_at, r.confirmed_at)
          < now() - make_interval(secs => $1 * power(2, r.resends))
    ORDER BY r.confirmed_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE gateway_job_requests r
SET resends = r.resends + 1,
    last_sent_at = now(),
    given_up_at = CASE WHEN r.resends >= $2 THEN now() END,
    error_message = CASE WHEN r.resends >= $2 THEN $4 END
FROM due WHERE r.job_id = due.job_id
RETURNING r.*
"""  # noqa: S608 (constants only)


async def claim_unrecorded(
    conn: asyncpg.Connection, *, resend_after: float, max_resends: int, limit: int
) -> list[JobRequest]:
    """The accepted requests the orchestrator has not recorded, due to be sent again
    (``resend_after`` seconds after the last send, doubling with each try), claimed for
    the caller inside its transaction: their ``resends`` counted and ``last_sent_at`` set
    in the same statement, so that another gateway does not send them too. A request past
    ``max_resends`` comes back given up (``given_up_at`` set) instead.

    First marks the rows whose job was recorded meanwhile, so that each row is looked at
    only until its job is recorded."""
    assert conn.is_in_transaction(), "claims need the caller's transaction"
    await conn.execute(
        "UPDATE gateway_job_requests r SET recorded_at = now() FROM jobs j "
        "WHERE j.id = r.job_id AND r.recorded_at IS NULL AND r.given_up_at IS NULL"
    )
    rows = await conn.fetch(
        _CLAIM,
        resend_after,
        max_resends,
        limit,
        GIVEN_UP_ERROR.format(tries=max_resends + 1),
    )
    return [_request(row) for row in rows]


_PRUNE: Final = """
DELETE FROM gateway_job_requests WHERE ctid = ANY(ARRAY(
    SELECT r.ctid FROM gateway_job_requests r
    WHERE r.created_at < $1
      AND (r.recorded_at IS NOT NULL OR r.given_up_at IS NOT NULL OR r.confirmed_at IS NULL
           OR EXISTS (SELECT 1 FROM jobs j WHERE j.id = r.job_id))
    LIMIT $2))
"""


async def prune(conn: asyncpg.Connection | asyncpg.Pool, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` rows created before ``before`` that no longer matter (their
    job recorded, given up, or never confirmed); how many. A confirmed request not
    recorded yet is never pruned: the ledger sweep still owes it."""
    status = await conn.execute(_PRUNE, before, limit)
    return int(status.rsplit(" ", 1)[-1])


def _request(row: asyncpg.Record) -> JobRequest:
    return JobRequest(
        job_id=row["job_id"],
        user_id=row["user_id"],
        canvas_id=row["canvas_id"],
        priority=row["priority"],
        query=row["query"],
        options=row["options"],
        idempotency_key=row["idempotency_key"],
        created_at=row["created_at"],
        confirmed_at=row["confirmed_at"],
        correlation_id=row["correlation_id"],
        resends=row["resends"],
        given_up_at=row["given_up_at"],
        retry_of=row["retry_of"],
    )
