"""Read models projected from the event store, in the transaction that appends.

- ``jobs``: one row a job, the fold of its stream (status, timestamps, result...).
- ``canvases``: who a canvas belongs to: the user of the first job that named it.
- ``canvas_objects``: written once, at JobCompleted, from the stream's GenerationSucceeded.

Every value comes from the events (times are their ``occurred_at``, never ``now()``),
so :func:`rebuild` reproduces the tables exactly, beside the live ones while the system
runs. The changes of each event are merged in order, as applying them one by one would
leave them; the changes of every running job one transaction touches become one
``UPDATE`` (a new job's rows are inserted one by one, in order).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg
import structlog

from canvas_events.events import (
    Event,
    GenerationRequested,
    GenerationStarted,
    GenerationSucceeded,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobRequested,
    JobRetryScheduled,
    parse_event,
)
from canvas_store.errors import ConcurrencyError
from canvas_store.events import JobChanges, RecordedEvent, read_after
from canvas_store.status import JobStatus

log = structlog.get_logger("canvas_orchestrator.projections")

# Columns that keep their first value: started_at is when the job first started.
_KEEP_FIRST = frozenset({"started_at"})
_READ_MODELS = ("canvas_objects", "canvases", "jobs")
# Where rebuild() builds the read models, and where it moves the old ones to drop them.
_SHADOW = "canvas_rebuild"
_RETIRED = "canvas_retired"
REBUILD_LOCK_KEY: Final = 0x63616E7661730004


def job_changes(recorded: RecordedEvent) -> dict[str, Any]:
    """The ``jobs`` columns one recorded event sets."""
    envelope = recorded.envelope
    changes: dict[str, Any] = {
        "version": recorded.version,
        "last_position": recorded.position,
        "updated_at": envelope.occurred_at,
    }
    event = parse_event(envelope)
    if isinstance(event, JobRequested):
        return changes | {
            "id": recorded.stream_id,
            "user_id": envelope.user_id,
            "canvas_id": event.canvas_id,
            "query": event.query,
            "priority": event.priority,
            "options": event.options,
            "idempotency_key": event.idempotency_key,
            "retry_of": event.retry_of,
            "status": JobStatus.QUEUED.value,
            "created_at": envelope.occurred_at,
            "retry_count": 0,
            "attempt": 0,
            "awaiting_dispatch": False,
        }
    return changes | _status_columns(event, envelope.occurred_at)


def _status_columns(event: Event, at: datetime) -> dict[str, Any]:
    """The columns an event after the JobRequested sets (none for the events whose
    change the next event of the same decision carries)."""
    match event:
        case JobQueued():
            return {
                "status": JobStatus.QUEUED.value,
                "retry_count": event.retry_count,
                "next_attempt_at": None,
                "awaiting_dispatch": True,
            }
        case GenerationRequested():
            return {
                "awaiting_dispatch": False,
                "attempt": event.attempt,
                "attempt_id": event.attempt_id,
                "lease_expires_at": event.lease_expires_at,
            }
        case GenerationStarted():
            started: dict[str, Any] = {"status": JobStatus.PROCESSING.value, "started_at": at}
            if event.lease_expires_at is not None:
                started["lease_expires_at"] = event.lease_expires_at
            return started
        case JobRetryScheduled():
            return {
                "status": JobStatus.RETRY_SCHEDULED.value,
                "retry_count": event.retry_count,
                "next_attempt_at": event.next_attempt_at,
                "error_message": event.error,
                "lease_expires_at": None,
                "awaiting_dispatch": False,
            }
        case JobCompleted():
            return _ended(JobStatus.COMPLETED, at) | {
                "result": event.model_dump(mode="json"),
                "error_message": None,
            }
        case JobFailed():
            return _ended(JobStatus.FAILED, at) | {
                "error_message": event.error,
                "retry_count": event.retry_count,
            }
        case JobCancelled():
            return _ended(JobStatus.CANCELLED, at)
    return {}


def _ended(status: JobStatus, at: datetime) -> dict[str, Any]:
    """What every final status sets: the job ended at ``at``, no timer waits."""
    return {
        "status": status.value,
        "completed_at": at,
        "lease_expires_at": None,
        "next_attempt_at": None,
        "awaiting_dispatch": False,
    }


def merge(changes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The changes of several events applied in order, as one."""
    merged: dict[str, Any] = {}
    for change in changes:
        for column, value in change.items():
            if column in _KEEP_FIRST and merged.get(column) is not None:
                continue
            merged[column] = value
    return merged


async def project(conn: asyncpg.Connection, recorded: Sequence[RecordedEvent]) -> None:
    """Apply the events of one append (one stream, in version order) to the read models."""
    await project_streams(conn, [recorded])


async def project_streams(
    conn: asyncpg.Connection, streams: Sequence[Sequence[RecordedEvent]]
) -> None:
    """Apply the events of several streams (each in version order) to the read models:
    a new job's rows one stream at a time, in the order given (the first job on a new
    canvas owns it), every other job's changes in one statement."""
    await _update_jobs(conn, await project_but_updates(conn, streams))


async def project_but_updates(
    conn: asyncpg.Connection, streams: Sequence[Sequence[RecordedEvent]]
) -> JobChanges:
    """:func:`project_streams`, but for the changes of jobs that have a row already,
    returned for the caller to apply (canvas_store.events.append_projected)."""
    updates: dict[Any, dict[str, Any]] = {}
    for recorded in streams:
        if not recorded:
            continue
        stream_id = recorded[0].stream_id
        assert all(item.stream_id == stream_id for item in recorded)
        changes = merge([job_changes(item) for item in recorded])
        if recorded[0].envelope.type == JobRequested.type_name():
            await _insert_job(conn, changes)
        else:
            # One row per job in the statement: a stream given twice, in order.
            earlier = updates.get(stream_id)
            updates[stream_id] = changes if earlier is None else merge([earlier, changes])
    for recorded in streams:
        for index, item in enumerate(recorded):
            if item.envelope.type == JobCompleted.type_name():
                await _place_objects(conn, item, recorded[:index])
    unknown = {column for changes in updates.values() for column in changes} - set(_UPDATED)
    assert not unknown, f"job_changes set columns the update does not know: {unknown}"
    return JobChanges(_JOB_ASSIGNMENTS, updates)


async def rebuild(pool: asyncpg.Pool, *, batch_size: int = 1_000) -> int:
    """Rebuild the read models from the event store beside the live ones and swap them in;
    returns how many events were replayed.

    The system keeps serving meanwhile: the new tables are built in a schema of their own
    (``canvas_rebuild``, the same table names found first on the search path), a page of
    events per short transaction, while reads and appends use the live tables. Then one
    transaction takes the live tables (every append touches ``jobs`` first, so appends
    wait for it too), replays what was appended since, and swaps the new tables in (and
    their indexes under the live names): a pause of a moment, not an outage."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", REBUILD_LOCK_KEY)  # one at a time
        try:
            await _prepare_shadow(conn)
            await conn.execute(f"SET search_path = {_SHADOW}, public")
            count, position = await _replay(conn, 0, batch_size)
            async with conn.transaction():
                await conn.execute(
                    f"LOCK TABLE {', '.join(f'public.{t}' for t in _READ_MODELS)} "
                    "IN ACCESS EXCLUSIVE MODE"
                )
                caught_up, _ = await _replay(conn, position, batch_size, transaction=False)
                await _swap(conn)
        finally:
            await conn.execute("RESET search_path")
            await conn.execute(f"DROP SCHEMA IF EXISTS {_SHADOW} CASCADE")
            await conn.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK_KEY)
    log.info("projections rebuilt", events=count + caught_up, during_swap=caught_up)
    return count + caught_up


async def _prepare_shadow(conn: asyncpg.Connection) -> None:
    """Empty copies of the live read models (columns, defaults, constraints, indexes)."""
    await conn.execute(f"DROP SCHEMA IF EXISTS {_SHADOW} CASCADE")
    await conn.execute(f"CREATE SCHEMA {_SHADOW}")
    for table in _READ_MODELS:
        await conn.execute(f"CREATE TABLE {_SHADOW}.{table} (LIKE public.{table} INCLUDING ALL)")


async def _replay(
    conn: asyncpg.Connection, after: int, batch_size: int, *, transaction: bool = True
) -> tuple[int, int]:
    """Project every event after position ``after`` into the tables the search path finds
    first, a page at a time (each in a transaction of its own, unless the caller holds
    one); (events replayed, last position)."""
    count = 0
    while True:
        async with conn.transaction() if transaction else contextlib.nullcontext():
            # In the swap (no transaction of its own) the caller's table locks hold off
            # every writer: every committed event is there to read, settled or not.
            page = await read_after(conn, after, batch_size, settled=transaction)
            # Each stream's events projected together, the streams in the order of their
            # first event in the page (so a new canvas still goes to the first job on it):
            # what projecting them one by one leaves, in far fewer statements.
            streams: dict[Any, list[RecordedEvent]] = {}
            for recorded in page:
                streams.setdefault(recorded.stream_id, []).append(recorded)
            await project_streams(conn, list(streams.values()))
        if not page:
            return count, after
        count += len(page)
        after = page[-1].position


async def _swap(conn: asyncpg.Connection) -> None:
    """Move the live read models out and the rebuilt ones in, with the live index names
    (inside the caller's transaction, which holds the live tables)."""
    await conn.execute(f"DROP SCHEMA IF EXISTS {_RETIRED} CASCADE")
    await conn.execute(f"CREATE SCHEMA {_RETIRED}")
    for table in _READ_MODELS:
        live = await _indexes(conn, "public", table)
        await conn.execute(f"ALTER TABLE public.{table} SET SCHEMA {_RETIRED}")
        await conn.execute(f"ALTER TABLE {_SHADOW}.{table} SET SCHEMA public")
        for shape, name in (await _indexes(conn, "public", table)).items():
            if live.get(shape, name) != name:
                await conn.execute(f'ALTER INDEX public."{name}" RENAME TO "{live[shape]}"')
    await conn.execute(f"DROP SCHEMA {_RETIRED} CASCADE")


async def _indexes(conn: asyncpg.Connection, schema: str, table: str) -> dict[str, str]:
    """{an index's shape (its definition without its name), its name} for a table."""
    rows = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
        schema,
        table,
    )
    return {
        re.sub(r" INDEX \S+ ON \S+ ", " INDEX ON ", row["indexdef"]): row["indexname"]
        for row in rows
    }


async def _insert_job(conn: asyncpg.Connection, changes: dict[str, Any]) -> None:
    """A new job's row, and its canvas's unless the canvas has one (its first job owns
    it), in one statement."""
    columns = list(changes)
    placeholders = ", ".join(f"${number}" for number in range(1, len(columns) + 1))
    try:
        await conn.execute(
            # Column names come from job_changes, never from input.
            f"WITH job AS (INSERT INTO jobs ({', '.join(columns)}) VALUES ({placeholders}) "  # noqa: S608
            "RETURNING canvas_id, user_id, created_at) "
            "INSERT INTO canvases (id, user_id, created_at) SELECT * FROM job "
            "ON CONFLICT (id) DO NOTHING",
            *(changes[column] for column in columns),
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "jobs_pkey":
            raise
        # Another writer recorded the job first (the projection runs before the append,
        # so this is where a lost race shows): a conflict, decided again on a fresh read.
        raise ConcurrencyError(f"job {changes['id']} was recorded meanwhile") from exc


# The columns an event after a job's JobRequested may set (job_changes).
_UPDATED: Final = (
    "version",
    "last_position",
    "updated_at",
    "status",
    "retry_count",
    "next_attempt_at",
    "attempt",
    "attempt_id",
    "lease_expires_at",
    "started_at",
    "error_message",
    "completed_at",
    "result",
    "awaiting_dispatch",
)


def _assignment(column: str) -> str:
    """``column`` set from the change's record when the change names it, else kept."""
    value = f"COALESCE(j.{column}, r.{column})" if column in _KEEP_FIRST else f"r.{column}"
    return f"{column} = CASE WHEN c.changes ? '{column}' THEN {value} ELSE j.{column} END"


# The SET items that apply a change to a jobs row, but for last_position (the append
# sets it): canvas_store.events.JobChanges.
_JOB_ASSIGNMENTS: Final = ", ".join(
    _assignment(column) for column in _UPDATED if column != "last_position"
)

# One statement for every job a transaction changed: each change is a JSON object of the
# columns it sets, read into a jobs record by jsonb_populate_record (so each value takes
# its column's type); a column the change does not name keeps its value.
_UPDATE_JOBS: Final = f"""
UPDATE jobs AS j SET {", ".join(_assignment(column) for column in _UPDATED)}
FROM unnest($1::uuid[], $2::jsonb[]) AS c(id, changes)
CROSS JOIN LATERAL jsonb_populate_record(NULL::jobs, c.changes) AS r
WHERE j.id = c.id
RETURNING j.id
"""  # noqa: S608 (column names are the constants above)


async def _update_jobs(conn: asyncpg.Connection, updates: JobChanges) -> None:
    """Every job's changed columns, by job id, in one statement."""
    if not updates.changes:
        return
    changes = updates.changes
    rows = await conn.fetch(_UPDATE_JOBS, list(changes), list(changes.values()))
    rows_missing(set(changes) - {row["id"] for row in rows})


def rows_missing(job_ids: Iterable[Any]) -> None:
    """Say that events were recorded for jobs without a row."""
    for stream_id in job_ids:
        # A stream without its JobRequested row: the read model is behind the store.
        log.error("jobs row missing for an event; run rebuild-projections", job_id=str(stream_id))


async def _place_objects(
    conn: asyncpg.Connection, completed: RecordedEvent, earlier: Sequence[RecordedEvent]
) -> None:
    """Put the objects of the GenerationSucceeded before ``completed`` on the canvas."""
    succeeded = next(
        (
            item
            for item in reversed(earlier)
            if item.envelope.type == GenerationSucceeded.type_name()
        ),
        None,
    )
    if succeeded is not None:
        objects = succeeded.envelope.data["objects"]
    else:
        objects = await conn.fetchval(
            "SELECT data -> 'objects' FROM events WHERE stream_id = $1 "
            "AND type = 'GenerationSucceeded' AND version < $2 ORDER BY version DESC LIMIT 1",
            completed.stream_id,
            completed.version,
        )
    object_ids = completed.envelope.data["object_ids"]
    if objects is None or len(objects) != len(object_ids):
        log.error(
            "objects of a completed job not found in its stream",
            job_id=str(completed.stream_id),
        )
        return
    await conn.execute(
        """
        INSERT INTO canvas_objects (id, canvas_id, job_id, user_id, index, object, created_at)
        SELECT o.id, j.canvas_id, j.id, j.user_id, (o.n - 1)::int, o.object, $2
        FROM jobs j,
             unnest($3::text[], $4::jsonb[]) WITH ORDINALITY AS o(id, object, n)
        WHERE j.id = $1
        ON CONFLICT (id) DO NOTHING
        """,
        completed.stream_id,
        completed.envelope.occurred_at,
        object_ids,
        objects,
    )
