"""What the notifier reads from the orchestrator's tables (it never writes)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg
import orjson

from canvas_events.envelope import Envelope
from canvas_notifier.frames import STATUS_TYPES

_REPLAY = """
SELECT position, event_id, type, schema_version, occurred_at, correlation_id,
       causation_id, stream_id, user_id, canvas_id, data::text AS data
FROM events
WHERE user_id = $1 AND position > $2 AND type = ANY($3::text[])
ORDER BY position
LIMIT $4
"""


async def replay_page(pool: asyncpg.Pool, user_id: str, after: int, limit: int) -> list[Envelope]:
    """``user_id``'s status events with a position above ``after``, in position order.

    Uses the (user_id, position) index; ``limit`` bounds one round trip.
    """
    rows = await pool.fetch(_REPLAY, user_id, after, list(STATUS_TYPES), limit)
    return [_envelope(row) for row in rows]


def _envelope(row: Any) -> Envelope:
    return Envelope(
        event_id=row["event_id"],
        type=row["type"],
        schema_version=row["schema_version"],
        occurred_at=row["occurred_at"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        job_id=row["stream_id"],
        user_id=row["user_id"],
        canvas_id=row["canvas_id"],
        position=row["position"],
        data=orjson.loads(row["data"]),
    )


async def head(pool: asyncpg.Pool, user_id: str) -> int:
    """The highest position of ``user_id``'s events, 0 when there is none."""
    value = await pool.fetchval(
        "SELECT coalesce(max(position), 0) FROM events WHERE user_id = $1", user_id
    )
    return int(value)


async def owns_job(pool: asyncpg.Pool, user_id: str, job_id: str) -> bool:
    """Whether ``job_id`` exists and is ``user_id``'s."""
    owner = await pool.fetchval("SELECT user_id FROM jobs WHERE id = $1", UUID(job_id))
    return bool(owner == user_id)


async def owns_canvas(pool: asyncpg.Pool, user_id: str, canvas_id: str) -> bool:
    """Whether ``canvas_id`` exists and is ``user_id``'s."""
    owner = await pool.fetchval("SELECT user_id FROM canvases WHERE id = $1", canvas_id)
    return bool(owner == user_id)
