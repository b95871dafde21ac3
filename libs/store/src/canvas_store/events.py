"""The append-only event store: one stream per job in the ``events`` table.

Optimistic concurrency comes from the primary key (stream_id, version). Global order
comes from ``position``, taken while the appending transaction holds one advisory lock
until it commits: appends commit one after another, so a reader that has seen position
N never later finds a smaller one (an identity column alone does not promise that: two
transactions take 7 and 8, 8 commits first, and a reader that saw 8 skips 7 forever).
Rolled-back appends leave holes in the numbering; readers ask for "after N", never for
"N + 1".

Every read here maps rows to envelopes one way, :func:`recorded_of`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import asyncpg

from canvas_events.envelope import Envelope
from canvas_store.errors import ConcurrencyError

# Any constant unique to this purpose; held per transaction, from the INSERT to COMMIT.
APPEND_LOCK_KEY: Final = 0x63616E7661730001
# Woken at every commit that appended events (NOTIFY is delivered at commit).
NOTIFY_CHANNEL: Final = "canvas_events_appended"

_COLUMNS = (
    "stream_id, version, position, event_id, type, schema_version, occurred_at, "
    "recorded_at, correlation_id, causation_id, user_id, canvas_id, data"
)


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored: its stream, version, global position and envelope (whose
    ``position`` and ``job_id`` are set)."""

    stream_id: UUID
    version: int
    position: int
    recorded_at: datetime
    envelope: Envelope


async def append(
    conn: asyncpg.Connection,
    stream_id: UUID,
    expected_version: int,
    envelopes: Sequence[Envelope],
    *,
    position_job: bool = False,
) -> list[RecordedEvent]:
    """Append ``envelopes`` to ``stream_id`` as versions ``expected_version + 1 ...``,
    inside the caller's transaction (see :func:`append_streams`)."""
    return await append_streams(
        conn, [Append(stream_id, expected_version, envelopes)], position_job=position_job
    )


@dataclass(frozen=True)
class Append:
    """Events for one stream, which must be at ``expected_version`` when they land."""

    stream_id: UUID
    expected_version: int
    envelopes: Sequence[Envelope]


# One round trip: the lock CTE is joined into the rows, so it is taken before any row
# (and its identity position) is produced, and held until commit.
_APPEND: Final = """
WITH append_lock AS (
    SELECT pg_advisory_xact_lock($13), pg_notify($14, '')
), appended AS (
    INSERT INTO events (stream_id, version, event_id, type, schema_version,
                        occurred_at, correlation_id, causation_id, user_id,
                        canvas_id, data)
    SELECT e.stream_id, e.version, e.event_id, e.type, e.schema_version,
           e.occurred_at, e.correlation_id, e.causation_id, e.user_id,
           e.canvas_id, e.data
    FROM append_lock,
         unnest($1::uuid[], $2::int[], $3::uuid[], $4::text[], $5::int[],
                $6::timestamptz[], $7::text[], $8::uuid[], $9::text[],
                $10::text[], $11::jsonb[])
         WITH ORDINALITY
         AS e(stream_id, version, event_id, type, schema_version, occurred_at,
              correlation_id, causation_id, user_id, canvas_id, data, n)
    ORDER BY e.n
    RETURNING stream_id, version, position, recorded_at
), positioned AS (
    UPDATE jobs SET last_position = a.position
    FROM (SELECT stream_id, max(position) AS position
          FROM appended GROUP BY stream_id) AS a
    WHERE $12::bool AND jobs.id = a.stream_id
)
SELECT stream_id, version, position, recorded_at FROM appended
"""


async def append_streams(
    conn: asyncpg.Connection, appends: Sequence[Append], *, position_job: bool = False
) -> list[RecordedEvent]:
    """Append each stream's envelopes as its versions ``expected_version + 1 ...``, all in
    one statement inside the caller's transaction; the recorded events come back in the
    order given (positions increase in that order).

    Raises :class:`ConcurrencyError` when another writer got to one of the streams first;
    the caller's transaction is then aborted and must be rolled back.

    With ``position_job``, the same statement sets each stream's ``jobs`` row's
    ``last_position`` to its last appended position: a caller that projected the events
    before appending them (so that the append lock is held for this statement and the
    commit only) gets the one column that needs positions filled in.
    """
    rows = [
        (item.stream_id, item.expected_version + number, envelope)
        for item in appends
        for number, envelope in enumerate(item.envelopes, start=1)
    ]
    if not rows:
        return []
    assert conn.is_in_transaction(), "append must run inside the caller's transaction"
    if any(envelope.user_id is None for _, _, envelope in rows):
        raise ValueError("every recorded event needs a user_id")
    try:
        stored = await conn.fetch(
            _APPEND, *_columns(rows), position_job, APPEND_LOCK_KEY, NOTIFY_CHANNEL
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "events_pkey":
            moved = ", ".join(f"{item.stream_id}@{item.expected_version}" for item in appends)
            raise ConcurrencyError(f"a stream moved past its expected version ({moved})") from exc
        raise
    by_key = {(row["stream_id"], row["version"]): row for row in stored}
    recorded = []
    for stream_id, version, envelope in rows:
        row = by_key[(stream_id, version)]
        recorded.append(
            RecordedEvent(
                stream_id=stream_id,
                version=version,
                position=row["position"],
                recorded_at=row["recorded_at"],
                envelope=envelope.model_copy(
                    update={"position": row["position"], "job_id": stream_id}
                ),
            )
        )
    return recorded


def _columns(rows: Sequence[tuple[UUID, int, Envelope]]) -> list[list[Any]]:
    """The eleven arrays of :data:`_APPEND`, one per column, from (stream, version,
    envelope) rows."""
    envelopes = [envelope for _, _, envelope in rows]
    return [
        [stream_id for stream_id, _, _ in rows],
        [version for _, version, _ in rows],
        [envelope.event_id for envelope in envelopes],
        [envelope.type for envelope in envelopes],
        [envelope.schema_version for envelope in envelopes],
        [envelope.occurred_at for envelope in envelopes],
        [envelope.correlation_id for envelope in envelopes],
        [envelope.causation_id for envelope in envelopes],
        [envelope.user_id for envelope in envelopes],
        [envelope.canvas_id for envelope in envelopes],
        [envelope.data for envelope in envelopes],
    ]


async def load_streams(
    conn: asyncpg.Connection, stream_ids: Sequence[UUID]
) -> dict[UUID, list[RecordedEvent]]:
    """Every event of each of ``stream_ids``, in version order (empty for an unknown
    stream), in one query."""
    streams: dict[UUID, list[RecordedEvent]] = {stream_id: [] for stream_id in stream_ids}
    if not streams:
        return streams
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM events WHERE stream_id = ANY($1::uuid[]) "  # noqa: S608 (constant columns)
        "ORDER BY stream_id, version",
        list(streams),
    )
    for row in rows:
        streams[row["stream_id"]].append(recorded_of(row))
    return streams


async def load(conn: asyncpg.Connection, stream_id: UUID) -> list[RecordedEvent]:
    """Every event of ``stream_id``, in version order (empty for an unknown stream)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM events WHERE stream_id = $1 ORDER BY version",  # noqa: S608 (constant columns)
        stream_id,
    )
    return [recorded_of(row) for row in rows]


async def read_after(conn: asyncpg.Connection, position: int, limit: int) -> list[RecordedEvent]:
    """Up to ``limit`` events of every stream with a position above ``position``, in
    position order."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2",  # noqa: S608 (constant columns)
        position,
        limit,
    )
    return [recorded_of(row) for row in rows]


async def last_position(conn: asyncpg.Connection) -> int:
    """The highest position recorded so far (0 for an empty store)."""
    value: int = await conn.fetchval("SELECT COALESCE(max(position), 0) FROM events")
    return value


async def user_events_after(
    conn: asyncpg.Connection | asyncpg.Pool,
    user_id: str,
    position: int,
    types: Sequence[str],
    limit: int,
) -> list[Envelope]:
    """Up to ``limit`` of ``user_id``'s events of the given ``types`` with a position
    above ``position``, in position order (the (user_id, position) index: a client's
    replay after a reconnect)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM events "  # noqa: S608 (constant columns)
        "WHERE user_id = $1 AND position > $2 AND type = ANY($3::text[]) "
        "ORDER BY position LIMIT $4",
        user_id,
        position,
        list(types),
        limit,
    )
    return [recorded_of(row).envelope for row in rows]


async def user_head(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> int:
    """The highest position of ``user_id``'s events (0 when there is none)."""
    value = await conn.fetchval(
        "SELECT coalesce(max(position), 0) FROM events WHERE user_id = $1", user_id
    )
    return int(value)


def recorded_of(row: asyncpg.Record) -> RecordedEvent:
    """An ``events`` row (every column of ``_COLUMNS``) as a recorded event."""
    envelope = Envelope(
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
        data=row["data"],
    )
    return RecordedEvent(
        stream_id=row["stream_id"],
        version=row["version"],
        position=row["position"],
        recorded_at=row["recorded_at"],
        envelope=envelope,
    )
