"""What a user sees of their jobs: the read models, and for a request the orchestrator
has not recorded yet, its ledger row in the same shape (``queued``, or ``failed`` once
given up). Read-your-writes: a job answered 202 is never 404.

Each read takes the user: a job, a stream or a canvas of someone else's is answered
exactly like one that does not exist (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import asyncpg

from canvas_store.events import load
from canvas_store.jobs import canvas_owner
from canvas_store.ledger import UNPROJECTED
from canvas_store.status import JobStatus

# The columns of the status answer, from the jobs read model...
_JOB_COLUMNS: Final = (
    "id, user_id, status, query, canvas_id, priority, created_at, started_at, completed_at, "
    "error_message, retry_count, next_attempt_at, result, retry_of, "
    # Why a queued job waits: its attempt waits for the fleet's model budget.
    "CASE WHEN status = 'queued' THEN (SELECT 'model capacity' FROM model_waits w "
    "WHERE w.attempt_id = jobs.attempt_id AND w.asked_at > now() - interval '30 seconds') "
    "END AS waiting_for"
)
# ...and the same shape for a ledger row the orchestrator has not projected yet.
_PENDING_COLUMNS: Final = (
    "r.job_id AS id, r.user_id, "
    "CASE WHEN r.given_up_at IS NULL THEN 'queued' ELSE 'failed' END AS status, "
    "r.query, r.canvas_id, r.priority::smallint AS priority, r.created_at, "
    "NULL::timestamptz AS started_at, r.given_up_at AS completed_at, "
    "r.error_message, 0 AS retry_count, NULL::timestamptz AS next_attempt_at, "
    "NULL::jsonb AS result, r.retry_of, NULL::text AS waiting_for"
)
# Statements are built from these constants only (hence the noqa: S608); values are
# always bound parameters.


async def job_view(
    conn: asyncpg.Connection, user_id: str | None, job_id: UUID
) -> dict[str, Any] | None:
    """The user's job in the status answer's shape (with ``user_id``), recorded or still
    pending; any user's with ``user_id`` None (operators only)."""
    row = await conn.fetchrow(
        f"""
        SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2::text IS NULL OR user_id = $2)
        UNION ALL
        SELECT {_PENDING_COLUMNS} FROM gateway_job_requests r
         WHERE r.job_id = $1 AND ($2::text IS NULL OR r.user_id = $2)
           AND r.confirmed_at IS NOT NULL AND {UNPROJECTED}
        LIMIT 1
        """,  # noqa: S608
        job_id,
        user_id,
    )
    return dict(row) if row is not None else None


async def job_request(conn: asyncpg.Connection, job_id: UUID) -> dict[str, Any] | None:
    """What a job was asked with (``user_id``, ``status``, ``query``, ``canvas_id``,
    ``priority``, ``options``), recorded or still pending; None when unknown. The caller
    checks who may see it."""
    row = await conn.fetchrow(
        f"""
        SELECT user_id, status, query, canvas_id, priority, options FROM jobs WHERE id = $1
        UNION ALL
        SELECT r.user_id, CASE WHEN r.given_up_at IS NULL THEN 'queued' ELSE 'failed' END,
               r.query, r.canvas_id, r.priority::smallint, r.options
          FROM gateway_job_requests r
         WHERE r.job_id = $1 AND r.confirmed_at IS NOT NULL AND {UNPROJECTED}
        LIMIT 1
        """,  # noqa: S608
        job_id,
    )
    return dict(row) if row is not None else None


async def job_page(
    conn: asyncpg.Connection,
    user_id: str,
    *,
    status: JobStatus | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[dict[str, Any]]:
    """A page of the user's jobs, newest first, after the cursor ``(created_at, id)``."""
    after_at, after_id = after if after is not None else (None, None)
    rows = await conn.fetch(
        f"""
        SELECT * FROM (
            SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = $1
            UNION ALL
            SELECT {_PENDING_COLUMNS} FROM gateway_job_requests r
             WHERE r.user_id = $1 AND r.confirmed_at IS NOT NULL
               AND r.recorded_at IS NULL AND {UNPROJECTED}
        ) mine
        WHERE ($2::text IS NULL OR status = $2)
          AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
        ORDER BY created_at DESC, id DESC
        LIMIT $5
        """,  # noqa: S608
        user_id,
        status.value if status is not None else None,
        after_at,
        after_id,
        limit,
    )
    return [dict(row) for row in rows]


@dataclass(frozen=True)
class JobFilter:
    """What an operator's job list keeps (each None: no filter)."""

    status: JobStatus | None = None
    user_id: str | None = None
    # Jobs created at or after this time.
    since: datetime | None = None
    # Text the job's query contains, case-insensitively (taken literally: % and _ too).
    text: str | None = None


# Each part filtered where its index can help; the ledger's part is only the requests not
# recorded yet (its partial index), so it stays small however long the ledger.
_FILTERS: Final = """
    ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR user_id = $2)
    AND ($3::timestamptz IS NULL OR created_at >= $3)
    AND ($4::text IS NULL OR query ILIKE $4 ESCAPE '\\')
    AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6::uuid))
"""
_ADMIN_PAGE: Final = f"""
SELECT * FROM (
    (SELECT {_JOB_COLUMNS} FROM jobs WHERE {_FILTERS}
     ORDER BY created_at DESC, id DESC LIMIT $7)
    UNION ALL
    (SELECT * FROM (
        SELECT {_PENDING_COLUMNS} FROM gateway_job_requests r
         WHERE r.confirmed_at IS NOT NULL AND r.recorded_at IS NULL AND {UNPROJECTED}
     ) pending WHERE {_FILTERS})
) page
ORDER BY created_at DESC, id DESC
LIMIT $7
"""  # noqa: S608


async def admin_job_page(
    conn: asyncpg.Connection,
    where: JobFilter,
    *,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[dict[str, Any]]:
    """A page of every user's jobs (operators only), newest first, after the cursor
    ``(created_at, id)``, each with its ``user_id`` and ``query``."""
    after_at, after_id = after if after is not None else (None, None)
    rows = await conn.fetch(
        _ADMIN_PAGE,
        where.status.value if where.status is not None else None,
        where.user_id,
        where.since,
        f"%{_like_literal(where.text)}%" if where.text is not None else None,
        after_at,
        after_id,
        limit,
    )
    return [dict(row) for row in rows]


def _like_literal(text: str) -> str:
    """``text`` with LIKE's wildcards and escape character taken literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def job_history(
    conn: asyncpg.Connection, user_id: str | None, job_id: UUID
) -> list[dict[str, Any]] | None:
    """The user's job's stream in version order (type, version, position, occurred_at,
    data of each event): empty for a request accepted but not recorded yet. Any user's
    with ``user_id`` None (operators only)."""
    history = await load(conn, job_id)
    if history:
        if user_id is not None and history[0].envelope.user_id != user_id:
            return None
        return [
            {
                "type": item.envelope.type,
                "version": item.version,
                "position": item.position,
                "occurred_at": item.envelope.occurred_at,
                "data": item.envelope.data,
            }
            for item in history
        ]
    return [] if await job_view(conn, user_id, job_id) is not None else None


async def canvas_objects(
    conn: asyncpg.Connection, user_id: str, canvas_id: str
) -> list[dict[str, Any]] | None:
    """The objects on the user's canvas in drawing order (each with its ``id`` and
    ``job_id`` first); empty for a canvas only named by a request not recorded yet."""
    owner = await canvas_owner(conn, canvas_id)
    if owner is None:
        pending = await conn.fetchval(
            "SELECT 1 FROM gateway_job_requests WHERE canvas_id = $1 AND user_id = $2 "
            "AND confirmed_at IS NOT NULL LIMIT 1",
            canvas_id,
            user_id,
        )
        return [] if pending else None
    if owner != user_id:
        return None
    rows = await conn.fetch(
        "SELECT id, job_id, object FROM canvas_objects WHERE canvas_id = $1 "
        "ORDER BY created_at, job_id, index",
        canvas_id,
    )
    objects = []
    for row in rows:
        fields = {k: v for k, v in row["object"].items() if k not in ("id", "job_id")}
        objects.append({"id": row["id"], "job_id": str(row["job_id"]), **fields})
    return objects
