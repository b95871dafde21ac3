"""The append-only event store: one stream per job in the ``events`` table.

Optimistic concurrency comes from the primary key (stream_id, version).

Global order comes from ``position``, which appends take side by side, with no lock
between them: an event's position is its transaction's id (``pg_current_xact_id()``)
times 4096 plus its number within the transaction (migration 0006). Transaction ids are
handed out in order, but transactions commit in any order, so a reader must not read
past the oldest transaction still in flight: every read of the global order here stops
below ``canvas_settled_positions_below()`` (that transaction's first possible position,
from the statement's snapshot, ``pg_current_snapshot()``). Below it nothing can be added
any more, so a reader that has read up to position N never later finds a smaller one.
The price: a write transaction left open anywhere in the cluster holds readers back
until it ends (every service session ends an idle transaction after 15 s). A reader
that keeps finding nothing settled asks :func:`read_settled_after` to leave out other
databases' transactions (``here``, migration 0013), which cannot append here.

Within a stream, positions follow versions: an append whose stream's last version was
written by a younger transaction (one that began after this one and committed first)
appends nothing and raises :class:`ConcurrencyError`; decided again in a new
transaction, it gets a younger id.

Positions are unique and increasing, not dense: readers ask for "after N", never for
"N + 1". Every read here maps rows to envelopes one way, :func:`recorded_of`.

Beside its envelope, an event keeps the traceparent of the span that recorded it
(migration 0010; None while traces are off): the relay publishes it in that trace.
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

# Positions per transaction id (migration 0006): the most events one transaction appends.
EVENTS_PER_TRANSACTION: Final = 4096
# Woken at every commit that appended events (NOTIFY is delivered at commit).
NOTIFY_CHANNEL: Final = "canvas_events_appended"

_COLUMNS = (
    "stream_id, version, position, event_id, type, schema_version, occurred_at, "
    "recorded_at, correlation_id, causation_id, user_id, canvas_id, data, traceparent"
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
    # The W3C traceparent of the span that recorded it (canvas_events.tracing).
    traceparent: str | None = None


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
    # One per envelope, in order (none: no trace to continue).
    traceparents: Sequence[str | None] = ()


# One round trip. ``overtaken``: a stream whose last version was appended by a younger
# transaction (see the module docstring); then nothing is inserted. The notification is
# delivered at commit (and dropped by a rollback). ``positioned`` sets each appended
# stream's jobs row's last_position (with $12), and applies the changes $17 gives, by
# job id ($18), with the assignments of :class:`JobChanges` ({assignments}).
_APPEND_TEMPLATE: Final = """
WITH notified AS (
    SELECT pg_notify($13, '')
), overtaken AS (
    SELECT 1 FROM events AS last
    JOIN unnest($14::uuid[], $15::int[]) AS s(stream_id, version)
      ON last.stream_id = s.stream_id AND last.version = s.version
    WHERE last.position >> 12 > pg_current_xact_id()::text::bigint
), appended AS (
    INSERT INTO events (stream_id, version, event_id, type, schema_version,
                        occurred_at, correlation_id, causation_id, user_id,
                        canvas_id, data, traceparent)
    SELECT e.stream_id, e.version, e.event_id, e.type, e.schema_version,
           e.occurred_at, e.correlation_id, e.causation_id, e.user_id,
           e.canvas_id, e.data, e.traceparent
    FROM notified,
         unnest($1::uuid[], $2::int[], $3::uuid[], $4::text[], $5::int[],
                $6::timestamptz[], $7::text[], $8::uuid[], $9::text[],
                $10::text[], $11::jsonb[], $16::text[])
         WITH ORDINALITY
         AS e(stream_id, version, event_id, type, schema_version, occurred_at,
              correlation_id, causation_id, user_id, canvas_id, data, traceparent, n)
    WHERE NOT EXISTS (SELECT 1 FROM overtaken)
    ORDER BY e.n
    RETURNING stream_id, version, position, recorded_at
), positioned AS (
    UPDATE jobs AS j SET last_position = a.position{assignments}
    FROM (SELECT stream_id, max(position) AS position
          FROM appended GROUP BY stream_id) AS a
    LEFT JOIN unnest($17::uuid[], $18::jsonb[]) AS c(id, changes) ON c.id = a.stream_id
    CROSS JOIN LATERAL jsonb_populate_record(NULL::jobs, c.changes) AS r
    WHERE $12::bool AND j.id = a.stream_id
    RETURNING j.id
)
SELECT stream_id, version, position, recorded_at,
       (SELECT array_agg(id) FROM positioned) AS positioned
FROM appended
"""
_APPEND: Final = _APPEND_TEMPLATE.format(assignments="")


@dataclass(frozen=True)
class JobChanges:
    """Changes to existing ``jobs`` rows, applied by :func:`append_projected` in the
    append's own statement (one round trip less than an ``UPDATE`` of their own):
    ``changes`` by job id, each a JSON object of the columns it sets, and
    ``assignments``, the ``SET`` items that apply them (``j`` the row, ``c.changes``
    the object, ``r`` the object read as a jobs record), a fixed text that never comes
    from input and never sets last_position (the append sets it)."""

    assignments: str
    changes: dict[UUID, dict[str, Any]]


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
    before appending them gets the one column that needs positions filled in.
    """
    recorded, _ = await _append(conn, _APPEND, appends, position_job, {})
    return recorded


async def append_projected(
    conn: asyncpg.Connection, appends: Sequence[Append], job_changes: JobChanges
) -> tuple[list[RecordedEvent], set[UUID]]:
    """:func:`append_streams` with ``position_job``, which also applies ``job_changes``
    (to jobs among the appended streams) in the same statement; the recorded events, and
    the ids of the jobs ``job_changes`` names that have no row."""
    statement = _APPEND_TEMPLATE.format(assignments=f", {job_changes.assignments}")
    recorded, positioned = await _append(conn, statement, appends, True, job_changes.changes)
    return recorded, set(job_changes.changes) - positioned if recorded else set()


async def _append(
    conn: asyncpg.Connection,
    statement: str,
    appends: Sequence[Append],
    position_job: bool,
    changes: dict[UUID, dict[str, Any]],
) -> tuple[list[RecordedEvent], set[UUID]]:
    """The append (see :func:`append_streams`): the recorded events, and the jobs whose
    rows the statement positioned."""
    rows = [
        (item.stream_id, item.expected_version + number, envelope)
        for item in appends
        for number, envelope in enumerate(item.envelopes, start=1)
    ]
    traceparents = [
        item.traceparents[number] if number < len(item.traceparents) else None
        for item in appends
        for number in range(len(item.envelopes))
    ]
    if not rows:
        return [], set()
    assert conn.is_in_transaction(), "append must run inside the caller's transaction"
    if any(envelope.user_id is None for _, _, envelope in rows):
        raise ValueError("every recorded event needs a user_id")
    followed = [item for item in appends if item.expected_version > 0]
    try:
        stored = await conn.fetch(
            statement,
            *_columns(rows),
            position_job,
            NOTIFY_CHANNEL,
            [item.stream_id for item in followed],
            [item.expected_version for item in followed],
            traceparents,
            list(changes),
            list(changes.values()),
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "events_pkey":
            raise ConcurrencyError(
                f"a stream moved past its expected version ({_streams(appends)})"
            ) from exc
        raise
    if len(stored) != len(rows):
        raise ConcurrencyError(
            f"a younger transaction appended to a stream first ({_streams(appends)})"
        )
    return _recorded(rows, traceparents, stored), set(stored[0]["positioned"] or ())


def _recorded(
    rows: Sequence[tuple[UUID, int, Envelope]],
    traceparents: Sequence[str | None],
    stored: Sequence[asyncpg.Record],
) -> list[RecordedEvent]:
    """The appended ``rows`` as recorded (positions from the ``stored`` rows), in order."""
    by_key = {(row["stream_id"], row["version"]): row for row in stored}
    recorded = []
    for (stream_id, version, envelope), traceparent in zip(rows, traceparents, strict=True):
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
                traceparent=traceparent,
            )
        )
    return recorded


def _streams(appends: Sequence[Append]) -> str:
    return ", ".join(f"{item.stream_id}@{item.expected_version}" for item in appends)


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


# Every read of the global order stops here (see the module docstring).
_SETTLED: Final = "position < canvas_settled_positions_below()"

# A user's replay stops here: the cluster's bound, or the floor the relay's reads past
# other databases' transactions raised (migration 0013), whichever is higher. Never
# below a bound the relay read with, so a replay never leaves out an event the relay
# already published.
_SETTLED_FOR_USER: Final = (
    "position < GREATEST(canvas_settled_positions_below(), (SELECT below FROM settled_floor))"
)


async def read_after(
    conn: asyncpg.Connection, position: int, limit: int, *, settled: bool = True
) -> list[RecordedEvent]:
    """Up to ``limit`` events of every stream with a position above ``position``, in
    position order, settled ones only (see the module docstring). ``settled=False``
    reads every committed one: only for a caller that holds off every writer itself
    (the rebuild's swap, under its table locks)."""
    if not settled:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2",  # noqa: S608 (constant columns)
            position,
            limit,
        )
        return [recorded_of(row) for row in rows]
    events, _ = await read_settled_after(conn, position, limit)
    return events


async def read_settled_after(
    conn: asyncpg.Connection, position: int, limit: int, *, here: bool = False
) -> tuple[list[RecordedEvent], bool]:
    """:func:`read_after`, and whether committed events follow that are not settled yet
    (an older transaction is still in flight): a reader should then look again soon,
    as the commit that settles them may notify nobody. One round trip, and no row past
    the bound is read.

    ``here``: leave out other databases' transactions in flight, which cannot append
    here (about a millisecond more: for a reader that found nothing settled a few times
    in a row), and raise the floor that users' replays read up to (settled_floor)."""
    rows = await conn.fetch(_READ_SETTLED_HERE if here else _READ_SETTLED, position, limit)
    return [recorded_of(row) for row in rows if row["position"] is not None], rows[0]["held"]


async def held_by_other_databases(conn: asyncpg.Connection) -> bool:
    """Whether the oldest transaction in flight in the cluster is another database's
    (one that pg_stat_activity shows there): what holds readers back then is nothing of
    this store's. About a millisecond of the database's time (migration 0013)."""
    return bool(
        await conn.fetchval(
            "SELECT canvas_settled_positions_below_here() > canvas_settled_positions_below()"
        )
    )


def _read_settled(bound: str, *, raise_floor: bool) -> str:
    """The statement of :func:`read_settled_after`: always one row at least (``held``),
    with the page's events, if any, beside it, below ``bound`` (an SQL expression)."""
    raised = (
        """, raised AS (
    UPDATE settled_floor SET below = bound.below FROM bound
    WHERE settled_floor.below < bound.below
)"""
        if raise_floor
        else ""
    )
    return f"""
WITH bound AS (
    SELECT b.below, EXISTS (
        SELECT 1 FROM events WHERE position >= b.below AND position > $1
    ) AS held
    FROM (SELECT {bound} AS below) AS b
){raised}
SELECT page.*, bound.held
FROM bound LEFT JOIN LATERAL (
    SELECT {_COLUMNS} FROM events
    WHERE position > $1 AND position < bound.below
    ORDER BY position LIMIT $2
) AS page ON true
"""  # noqa: S608 (constant columns and bounds)


# Below the oldest transaction in flight anywhere in the cluster.
_READ_SETTLED: Final = _read_settled("canvas_settled_positions_below()", raise_floor=False)
# Below the oldest one in this database (canvas_settled_positions_below_here(), which
# reads pg_stat_activity: about a millisecond), raising settled_floor to that bound in
# the same statement, so that the floor is committed before anything read is published.
_READ_SETTLED_HERE: Final = _read_settled("canvas_settled_positions_below_here()", raise_floor=True)


async def last_position(conn: asyncpg.Connection) -> int:
    """The highest settled position so far (0 for an empty store)."""
    value: int = await conn.fetchval(
        f"SELECT COALESCE(max(position), 0) FROM events WHERE {_SETTLED}"  # noqa: S608 (constant)
    )
    return value


async def count_after(conn: asyncpg.Connection, position: int) -> int:
    """How many events have a position above ``position`` (settled or not): what a
    reader at ``position`` has still to read."""
    value: int = await conn.fetchval("SELECT count(*) FROM events WHERE position > $1", position)
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
        f"WHERE user_id = $1 AND position > $2 AND type = ANY($3::text[]) AND {_SETTLED_FOR_USER} "
        "ORDER BY position LIMIT $4",
        user_id,
        position,
        list(types),
        limit,
    )
    return [recorded_of(row).envelope for row in rows]


async def user_head(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> int:
    """The highest settled position of ``user_id``'s events (0 when there is none)."""
    value = await conn.fetchval(
        f"SELECT coalesce(max(position), 0) FROM events WHERE user_id = $1 AND {_SETTLED_FOR_USER}",  # noqa: S608 (constant)
        user_id,
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
        traceparent=row["traceparent"],
    )
