"""Reads of the job-orchestrator's read models (``jobs``, ``canvases``), for every
service: a job's row, an attempt's standing, who owns a canvas or a job, how much work
waits, and the operators' counts.

The orchestrator writes these tables (its projections); every other service reads them
through here, so a renamed column breaks this module's tests, not another service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from uuid import UUID

import asyncpg

from canvas_store.status import JobStatus

# Every column of a jobs row, as the orchestrator's internal API answers it.
JOB_COLUMNS: Final = (
    "id, user_id, canvas_id, query, priority, options, idempotency_key, status, created_at, "
    "updated_at, started_at, completed_at, error_message, retry_count, next_attempt_at, "
    "attempt, attempt_id, lease_expires_at, result, version, last_position"
)
# The statuses in which a job waits for the result of its current attempt.
_WAITING_FOR_ATTEMPT: Final = frozenset({JobStatus.QUEUED.value, JobStatus.PROCESSING.value})

# Anything with fetchval/fetchrow/fetch: a connection, or a pool for one statement.
Queryable: TypeAlias = asyncpg.Connection | asyncpg.Pool


async def job_row(conn: Queryable, job_id: UUID) -> dict[str, Any] | None:
    """The whole ``jobs`` row of ``job_id`` (:data:`JOB_COLUMNS`), None when unknown."""
    row = await conn.fetchrow(
        f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1",  # noqa: S608 (constant columns)
        job_id,
    )
    return dict(row) if row is not None else None


@dataclass(frozen=True)
class AttemptStanding:
    """Whether an attempt is still the one its job waits for."""

    attempt_id: UUID
    job_id: UUID
    status: str
    current: bool


async def attempt_standing(
    conn: Queryable, attempt_id: UUID, job_id: UUID | None = None
) -> AttemptStanding | None:
    """The standing of ``attempt_id``; None when neither its job (when given) nor a job
    whose current attempt it is exists. Without ``job_id`` only a current attempt can be
    found, by a scan."""
    if job_id is not None:
        row = await conn.fetchrow("SELECT id, status, attempt_id FROM jobs WHERE id = $1", job_id)
    else:
        row = await conn.fetchrow(
            "SELECT id, status, attempt_id FROM jobs WHERE attempt_id = $1", attempt_id
        )
    if row is None:
        return None
    current = row["attempt_id"] == attempt_id and row["status"] in _WAITING_FOR_ATTEMPT
    return AttemptStanding(attempt_id, row["id"], row["status"], current)


async def canvas_owner(conn: Queryable, canvas_id: str) -> str | None:
    """The user whose first job named ``canvas_id``; None for a canvas nobody drew on."""
    owner: str | None = await conn.fetchval("SELECT user_id FROM canvases WHERE id = $1", canvas_id)
    return owner


async def canvas_owners(conn: Queryable, canvas_ids: list[str]) -> dict[str, str]:
    """The owners of those of ``canvas_ids`` somebody drew on (the others are absent)."""
    rows = await conn.fetch(
        "SELECT id, user_id FROM canvases WHERE id = ANY($1::text[])", canvas_ids
    )
    return {row["id"]: row["user_id"] for row in rows}


async def job_owner(conn: Queryable, job_id: UUID) -> str | None:
    """The user of a recorded job; None when the job is not recorded."""
    owner: str | None = await conn.fetchval("SELECT user_id FROM jobs WHERE id = $1", job_id)
    return owner


async def oldest_queued_age(conn: Queryable) -> float:
    """Seconds since the longest-waiting queued job was (re)queued; 0 when none is (the
    jobs_status index; a queued job's updated_at is when it was queued)."""
    age = await conn.fetchval(
        "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(updated_at)), 0) "
        "FROM jobs WHERE status = 'queued'"
    )
    return max(0.0, float(age))


async def recent_jobs(conn: Queryable, limit: int = 20) -> list[dict[str, Any]]:
    """The newest jobs across all users (operators only). ``error_message`` is the last
    attempt's error: kept while a retried job waits again, cleared on success."""
    rows = await conn.fetch(
        "SELECT id, user_id, canvas_id, status, created_at, updated_at, attempt, "
        "retry_count, next_attempt_at, error_message FROM jobs "
        "ORDER BY created_at DESC, id DESC LIMIT $1",
        limit,
    )
    return [dict(row) for row in rows]


async def busiest_users(conn: Queryable, limit: int = 10) -> list[tuple[str, int]]:
    """The users with the most unfinished jobs (queued, processing, retry_scheduled),
    most first: who a queue's backlog belongs to (the jobs_user_active index)."""
    rows = await conn.fetch(
        "SELECT user_id, count(*) AS n FROM jobs "
        "WHERE status IN ('queued', 'processing', 'retry_scheduled') "
        "GROUP BY user_id ORDER BY n DESC, user_id LIMIT $1",
        limit,
    )
    return [(row["user_id"], row["n"]) for row in rows]


async def job_counts(conn: Queryable) -> dict[str, int]:
    """How many jobs are in each status (operators only)."""
    rows = await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
    return {row["status"]: row["n"] for row in rows}


@dataclass(frozen=True)
class Backlog:
    """What waits, as the gateway's health check reports it."""

    # Seconds since the longest-waiting queued job was queued (or dispatched); None when
    # no job is queued. Requests the orchestrator has not recorded yet are not counted:
    # its queue's depth and consumers tell about those.
    oldest_queued_age_seconds: float | None
    # Events recorded but not yet published by the relay (those after its checkpoint).
    outbox_lag: int
    # Seconds the oldest of those has waited; None when the relay is caught up.
    oldest_unpublished_age_seconds: float | None


# One round trip, each part an index range scan: jobs_status for the queued jobs, the
# position index for the unpublished events. min() over relay_checkpoints: there is one
# relay checkpoint, and with more the laggiest is the one that matters.
# clock_timestamp(), not now(): the statement's own time, not its transaction's.
_BACKLOG: Final = """
WITH checkpoint AS (
    SELECT COALESCE((SELECT min(position) FROM relay_checkpoints), 0) AS position
)
SELECT
    (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(updated_at))
       FROM jobs WHERE status = 'queued') AS oldest_queued_age,
    (SELECT count(*) FROM events
       WHERE position > (SELECT position FROM checkpoint)) AS outbox_lag,
    (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(recorded_at))
       FROM events WHERE position > (SELECT position FROM checkpoint)) AS oldest_unpublished_age
"""


async def backlog(conn: Queryable) -> Backlog:
    """How long work waits: for a generator, and for the orchestrator's relay."""
    row = await conn.fetchrow(_BACKLOG)
    assert row is not None
    return Backlog(
        oldest_queued_age_seconds=_seconds(row["oldest_queued_age"]),
        outbox_lag=max(0, int(row["outbox_lag"])),
        oldest_unpublished_age_seconds=_seconds(row["oldest_unpublished_age"]),
    )


def _seconds(value: Any) -> float | None:
    """An age in seconds, rounded to 0.1 s; never negative (a service's clock may be a
    little ahead of the database's)."""
    return None if value is None else max(0.0, round(float(value), 1))
