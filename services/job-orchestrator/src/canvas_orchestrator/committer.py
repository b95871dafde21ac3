"""One path for recording a decision: the transaction in which the message handler and
the timers alike record what they decided.

In one :meth:`Committer.transaction`:

1. ``lock``: the consumed messages' ids go into ``processed_messages`` (a redelivery
   changes nothing) and the jobs' rows are locked, in id order, in one round trip; a job
   without a row has its recording lock taken (with the locks of the canvases new jobs
   name, in the same round trip) and is looked for again (another replica may have
   recorded it meanwhile), and the cancels requested for it, whether its stream has any
   event and the canvases' owners are read under those locks, in one more;
2. ``load``: each job's stream, read again only when its row's version says another
   writer moved it since this process last recorded it (the stream cache);
3. the caller decides, and ``record`` stages each decision's events on its stream,
   evolving the job's state as it goes;
4. at the end: the read models are projected, then every stream is appended in one
   statement, and the transaction commits. One append for many jobs is what lets the
   store keep up under load.

A writer that lost a race (another appended first) gets one of :data:`CONFLICTS` and
decides again on a fresh read.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final
from uuid import UUID

import asyncpg
from prometheus_client import Histogram

from canvas_events.envelope import Envelope
from canvas_events.events import Event, parse_event
from canvas_events.postgres import JOB_RECORDING_LOCK_CLASS, Database
from canvas_orchestrator import domain
from canvas_orchestrator.domain import JobState
from canvas_orchestrator.projections import project_but_updates, rows_missing
from canvas_store import cancels
from canvas_store.errors import ConcurrencyError
from canvas_store.events import Append, RecordedEvent, append_projected, load_streams
from canvas_store.jobs import canvas_owners

Clock = Callable[[], datetime]

# The consumer name of the orchestrator's processed_messages rows.
CONSUMER: Final = "job-orchestrator"
# Namespace of the two-key advisory locks that serialise new jobs on one canvas.
CANVAS_LOCK_CLASS: Final = 0x63610002
# Running jobs whose state is kept between transactions, at most.
KNOWN_JOBS: Final = 2_000
# Another writer was first; what was decided is fine, so decide again on a fresh read.
CONFLICTS: Final = (
    ConcurrencyError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)

# The recording locks of jobs without a row (in id order), then the locks of the
# canvases their requests name (in id order, as lock_canvases takes them): one round trip.
_RECORDING_LOCKS: Final = """
SELECT pg_advisory_xact_lock($1, hashtext(id::text)) FROM unnest($2::uuid[]) AS id
UNION ALL
SELECT pg_advisory_xact_lock($3, hashtext(c.id))
FROM (SELECT id FROM unnest($4::text[]) AS id ORDER BY id) AS c
"""

# Read once those locks are held (one round trip): a job's row, locked, if another
# replica recorded it meanwhile; the cancels requested for it; whether its stream has
# events (none, for a job with no row, unless the read model is behind the store); the
# owners of the canvases locked. A row locked by another transaction is not waited for
# (NOWAIT) while the canvas locks are held: the batch is decided again, and then takes
# that row's lock first, as every transaction takes its locks (rows, then canvases).
_AFTER_RECORDING_LOCKS: Final = """
WITH locked AS (
    SELECT id, version FROM jobs WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE NOWAIT
)
SELECT 'row' AS kind, id, version, NULL::jsonb AS envelope, NULL::text AS canvas_id,
       NULL::text AS owner
FROM locked
UNION ALL
SELECT 'cancel', job_id, NULL, envelope, NULL, NULL
FROM cancel_requests WHERE job_id = ANY($1::uuid[])
UNION ALL
SELECT 'events', s.id, NULL, NULL, NULL, NULL FROM unnest($1::uuid[]) AS s(id)
WHERE EXISTS (SELECT 1 FROM events WHERE stream_id = s.id)
UNION ALL
SELECT 'canvas', NULL, NULL, NULL, id, user_id FROM canvases WHERE id = ANY($2::text[])
"""


@dataclass
class Stream:
    """One job within a transaction: its stream as read, and its state as the events
    staged on it evolve it."""

    job_id: UUID
    state: JobState
    history: list[RecordedEvent]
    owner: str | None
    base_version: int
    staged: list[Envelope] = field(default_factory=list)
    # The trace each staged event continues (its traceparent, None for none).
    traceparents: list[str | None] = field(default_factory=list)
    # After the commit: the staged events as recorded, with their positions.
    recorded: list[RecordedEvent] = field(default_factory=list)

    def stage(
        self,
        decided: Sequence[Event],
        cause: Envelope,
        now: datetime,
        traceparent: str | None = None,
    ) -> None:
        """Stage ``decided``, which ``cause`` led to, and evolve the state by them. The
        recorded copy of an incoming event keeps the time it happened at its source;
        what the orchestrator decides happened at ``now`` (so that next_attempt_at -
        occurred_at is exactly the backoff). ``traceparent``: the trace they continue."""
        for event in decided:
            if self.owner is None:
                self.owner = cause.user_id
            canvas_id = (
                self.state.canvas_id if self.state.exists else getattr(event, "canvas_id", None)
            )
            source = event.type_name() == cause.type
            self.staged.append(
                cause.follow(
                    event,
                    job_id=self.job_id,
                    user_id=self.owner,
                    canvas_id=canvas_id,
                    occurred_at=cause.occurred_at if source else now,
                )
            )
            self.traceparents.append(traceparent)
            self.state = domain.evolve(self.state, event)


class Transaction:
    """What :meth:`Committer.transaction` yields; see the module docstring."""

    def __init__(self, conn: asyncpg.Connection, now: datetime, known: dict[UUID, Stream]) -> None:
        self.conn = conn
        self.now = now
        self._known = known
        self._versions: dict[UUID, int] = {}
        # Jobs locked by their recording lock that have neither a row nor an event.
        self._empty: set[UUID] = set()
        # The cancels requested for jobs that had no row when locked.
        self.new_job_cancels: dict[UUID, Envelope] = {}
        # Streams with staged events, in the order they were first staged: the order they
        # are appended in, so that positions tell the order the decisions were made in
        # (the first job on a new canvas is the one that owns it, on replay too).
        self.changed: dict[UUID, Stream] = {}
        # When the append began (perf_counter), once it has: append to commit.
        self.appended_at: float | None = None
        # The owners of the canvases locked so far (None: nobody drew on it yet).
        self._canvas_owners: dict[str, str | None] = {}
        # New jobs this transaction may still dispatch at once (fair dispatch's fast
        # path); None: every new job is dispatched at once (no fair dispatch).
        self.dispatch_slots: int | None = None

    async def lock(
        self,
        job_ids: Sequence[UUID],
        *,
        messages: Sequence[UUID] = (),
        canvases: Iterable[str] = (),
    ) -> set[UUID]:
        """Lock ``job_ids`` (sorted) and mark ``messages`` processed; the message ids
        that were not processed before. ``canvases``: those that new jobs among them
        may claim, locked with the jobs' recording locks (see :meth:`lock_canvases`)."""
        rows = await self.conn.fetch(
            """
            WITH fresh AS (
                INSERT INTO processed_messages (consumer, message_id)
                SELECT $1, m FROM unnest($2::uuid[]) AS m
                ON CONFLICT DO NOTHING RETURNING message_id
            ), locked AS (
                SELECT id, version FROM jobs WHERE id = ANY($3::uuid[])
                ORDER BY id FOR UPDATE
            )
            SELECT message_id AS id, NULL::int AS version FROM fresh
            UNION ALL
            SELECT id, version FROM locked
            """,
            CONSUMER,
            list(messages),
            list(job_ids),
        )
        fresh = {row["id"] for row in rows if row["version"] is None}
        self._versions |= {row["id"]: row["version"] for row in rows if row["version"] is not None}
        missing = [job_id for job_id in job_ids if job_id not in self._versions]
        if missing and (fresh or not messages):
            await self._lock_new_jobs(missing, sorted(set(canvases)))
        return fresh

    async def _lock_new_jobs(self, job_ids: Sequence[UUID], canvases: list[str]) -> None:
        """Take the recording lock of each job that had no row (in id order, as every
        transaction does), and the locks of ``canvases``, then look again: another
        replica may have recorded one while this one waited. The gateway writes a
        cancel under the same lock, so none written before is missed."""
        await self.conn.execute(
            _RECORDING_LOCKS, JOB_RECORDING_LOCK_CLASS, list(job_ids), CANVAS_LOCK_CLASS, canvases
        )
        try:
            rows = await self.conn.fetch(_AFTER_RECORDING_LOCKS, list(job_ids), canvases)
        except asyncpg.LockNotAvailableError as exc:
            raise ConcurrencyError("a new job was recorded meanwhile and is locked") from exc
        self._versions |= {row["id"]: row["version"] for row in rows if row["kind"] == "row"}
        recorded = [job_id for job_id in job_ids if job_id in self._versions]
        if recorded:
            # Recorded meanwhile by another replica, whose row lock may have been waited
            # for: its cancels are read again, after that wait.
            self.new_job_cancels = await cancels.pending(self.conn, job_ids)
        else:
            self.new_job_cancels = {
                row["id"]: Envelope.model_validate(row["envelope"])
                for row in rows
                if row["kind"] == "cancel"
            }
        # A job with neither a row nor an event (the common case): no stream to read.
        with_events = {row["id"] for row in rows if row["kind"] == "events"}
        self._empty |= {job_id for job_id in job_ids if job_id not in recorded} - with_events
        owners = {row["canvas_id"]: row["owner"] for row in rows if row["kind"] == "canvas"}
        self._canvas_owners |= {canvas_id: owners.get(canvas_id) for canvas_id in canvases}

    def is_recorded(self, job_id: UUID) -> bool:
        """Whether the locked job has a row (a job not recorded yet has none)."""
        return job_id in self._versions

    async def load(self, job_ids: Sequence[UUID]) -> dict[UUID, Stream]:
        """Each job's stream and state: as this process recorded it last when its locked
        row says nothing moved since, else read (one query for all)."""
        found: dict[UUID, tuple[JobState, list[RecordedEvent]]] = {}
        for job_id in job_ids:
            known = self._known.get(job_id)
            if known is not None and known.state.version == self._versions.get(job_id):
                found[job_id] = (known.state, known.history)
        for job_id in self._empty.intersection(job_ids):
            found[job_id] = (state_of([], job_id), [])
        unknown = [job_id for job_id in job_ids if job_id not in found]
        for job_id, history in (await load_streams(self.conn, unknown)).items():
            found[job_id] = (state_of(history, job_id), history)
        return {
            job_id: Stream(
                job_id=job_id,
                state=state,
                history=history,
                owner=history[0].envelope.user_id if history else None,
                base_version=state.version,
            )
            for job_id, (state, history) in found.items()
        }

    def stage(
        self,
        stream: Stream,
        decided: Sequence[Event],
        cause: Envelope,
        traceparent: str | None = None,
    ) -> None:
        """Stage ``decided`` on ``stream`` (see :meth:`Stream.stage`), to be recorded
        when the transaction ends, in the trace of ``traceparent``."""
        if decided:
            stream.stage(decided, cause, self.now, traceparent)
            self.changed.setdefault(stream.job_id, stream)

    async def lock_canvases(self, canvas_ids: Iterable[str]) -> None:
        """Lock the canvases new jobs of this transaction name, in id order and in one
        statement, then read their owners in another (read after the locks are held, so
        the first job on a new canvas is seen by any other that names it)."""
        wanted = sorted(set(canvas_ids) - set(self._canvas_owners))
        if not wanted:
            return
        # A volatile function in the select list runs after the sort: in id order.
        await self.conn.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext(id)) FROM unnest($2::text[]) AS id "
            "ORDER BY id",
            CANVAS_LOCK_CLASS,
            wanted,
        )
        owners = await canvas_owners(self.conn, wanted)
        self._canvas_owners.update({canvas_id: owners.get(canvas_id) for canvas_id in wanted})

    async def canvas_available(self, canvas_id: str, user_id: str | None) -> bool:
        """Whether ``user_id`` may draw on ``canvas_id``: it is new, or it is theirs. Two
        first jobs on one new canvas by two users: the second waits, then sees the first."""
        await self.lock_canvases([canvas_id])
        owner = self._canvas_owners[canvas_id]
        return owner is None or owner == user_id

    async def _flush(self) -> None:
        """Project (new jobs' rows first), then append every changed stream and apply
        the running jobs' changes to their rows, in one statement."""
        job_changes = await project_but_updates(
            self.conn, [_unpositioned(stream, self.now) for stream in self.changed.values()]
        )
        if self.changed:
            self.appended_at = time.perf_counter()
        recorded, missing = await append_projected(
            self.conn,
            [
                Append(s.job_id, s.base_version, s.staged, s.traceparents)
                for s in self.changed.values()
            ],
            job_changes,
        )
        rows_missing(missing)
        offset = 0
        for stream in self.changed.values():
            stream.recorded = recorded[offset : offset + len(stream.staged)]
            offset += len(stream.staged)


class Committer:
    """Opens the transactions decisions are recorded in, and keeps the stream cache."""

    def __init__(
        self,
        database: Database,
        *,
        clock: Callable[[], datetime],
        append_commit: Histogram | None = None,
    ) -> None:
        self._database = database
        self._clock = clock
        # Observes each appending transaction's time from its append to its commit.
        self._append_commit = append_commit
        # The streams of the running jobs this process recorded last, newest last.
        self._known: OrderedDict[UUID, Stream] = OrderedDict()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A transaction whose staged events are projected, appended and committed when
        the block ends without an error (nothing is, when it raises)."""
        async with self._database.pool.acquire() as conn:
            async with conn.transaction():
                tx = Transaction(conn, self._clock(), self._known)
                yield tx
                await tx._flush()
            if tx.appended_at is not None and self._append_commit is not None:
                self._append_commit.observe(time.perf_counter() - tx.appended_at)
            for stream in tx.changed.values():
                self._remember(stream)

    def _remember(self, stream: Stream) -> None:
        """Keep a running job's stream as committed, for its next transaction."""
        if stream.state.is_final:
            self._known.pop(stream.job_id, None)
            return
        self._known[stream.job_id] = Stream(
            job_id=stream.job_id,
            state=stream.state,
            history=[*stream.history, *stream.recorded],
            owner=stream.owner,
            base_version=stream.state.version,
        )
        self._known.move_to_end(stream.job_id)
        while len(self._known) > KNOWN_JOBS:
            self._known.popitem(last=False)


def _unpositioned(stream: Stream, now: datetime) -> list[RecordedEvent]:
    """The staged events as they will be recorded, but for their positions (0 until the
    append, which sets the jobs row's last_position itself)."""
    return [
        RecordedEvent(
            stream_id=stream.job_id,
            version=stream.base_version + number,
            position=0,
            recorded_at=now,
            envelope=envelope,  # job_id set by follow()
        )
        for number, envelope in enumerate(stream.staged, start=1)
    ]


def state_of(history: Sequence[RecordedEvent], job_id: UUID) -> JobState:
    """The fold of a loaded stream."""
    return domain.fold(job_id, (parse_event(item.envelope) for item in history))
