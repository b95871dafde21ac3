"""Every SQL statement of the gateway.

The gateway's only state is one table, ``gateway_job_requests``: a ledger of the job
requests it accepted. It exists for three things the orchestrator's read models cannot
do in the instant between the broker's confirm and the orchestrator's projection:

- read-your-writes: right after a 202, the status of a job the orchestrator has not
  projected yet is answered from the ledger row (``queued``), never 404;
- idempotency: ``UNIQUE (user_id, idempotency_key)``, and a job id derived from them,
  give a retried request the same job and no second one;
- the per-user limit: it counts the requests confirmed (or still being published) but
  not yet projected, so a burst cannot slip past the limit;
- the last line of defence: a confirmed request the orchestrator has not recorded a
  while later (its message purged, dead-lettered or lost with a deleted queue) is sent
  again, and given up with a reason after a few tries (:mod:`canvas_gateway.ledger`).

A row is inserted before the publish and gets ``confirmed_at`` once the broker
confirmed it; only confirmed rows are ever shown. ``recorded_at`` marks the rows whose
job the orchestrator has recorded (the sweep needs to look at each row only until
then); ``given_up_at`` and ``error_message`` a request given up. The gateway creates
the table itself when its pool connects (``CREATE TABLE IF NOT EXISTS`` under an
advisory lock, so several gateways may start at once). Everything else it
reads (jobs, canvases, canvas_objects, events) belongs to the job-orchestrator
(its migrations/0001_event_store.sql); until those exist, reads raise
:class:`StoreNotReady`. The one exception is ``cancel_requests``, where a user's cancel is
written before the 202 (:meth:`Store.request_cancel` says why and how it is locked).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from canvas_events.envelope import Envelope
from canvas_events.events import JobRequested
from canvas_events.logging import redact
from canvas_events.postgres import JOB_RECORDING_LOCK_CLASS, Database, is_outage
from canvas_gateway.errors import CanvasNotFound, LimitReached, StoreNotReady, StoreUnavailable
from canvas_gateway.schemas import ACTIVE_STATUSES, FINAL_STATUSES, JobStatus

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS gateway_job_requests (
    job_id          uuid        PRIMARY KEY,
    user_id         text        NOT NULL,
    canvas_id       text        NOT NULL,
    priority        smallint    NOT NULL,
    query           text        NOT NULL,
    options         jsonb       NOT NULL DEFAULT '{}',
    idempotency_key text,
    correlation_id  text        NOT NULL,
    created_at      timestamptz NOT NULL,
    confirmed_at    timestamptz,
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS gateway_job_requests_user
    ON gateway_job_requests (user_id, created_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS gateway_job_requests_canvas
    ON gateway_job_requests (canvas_id);
ALTER TABLE gateway_job_requests
    ADD COLUMN IF NOT EXISTS recorded_at   timestamptz,
    ADD COLUMN IF NOT EXISTS resends       integer     NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS last_sent_at  timestamptz,
    ADD COLUMN IF NOT EXISTS given_up_at   timestamptz,
    ADD COLUMN IF NOT EXISTS error_message text;
-- The sweep's rows, and the limit's: accepted, not known recorded yet, not given up.
CREATE INDEX IF NOT EXISTS gateway_job_requests_unrecorded
    ON gateway_job_requests (confirmed_at) WHERE recorded_at IS NULL AND given_up_at IS NULL;
CREATE INDEX IF NOT EXISTS gateway_job_requests_user_unrecorded
    ON gateway_job_requests (user_id) WHERE recorded_at IS NULL AND given_up_at IS NULL;
"""

# The columns of the status answer (ARCHITECTURE.md 4), from the jobs read model...
_JOB_COLUMNS = (
    "id, status, canvas_id, priority, created_at, started_at, completed_at, "
    "error_message, retry_count, next_attempt_at, result"
)
# ...and the same shape for a ledger row the orchestrator has not projected yet: queued,
# or failed once given up.
_PENDING_COLUMNS = (
    "r.job_id AS id, CASE WHEN r.given_up_at IS NULL THEN 'queued' ELSE 'failed' END AS status, "
    "r.canvas_id, r.priority::smallint AS priority, r.created_at, "
    "NULL::timestamptz AS started_at, r.given_up_at AS completed_at, "
    "r.error_message, 0 AS retry_count, NULL::timestamptz AS next_attempt_at, "
    "NULL::jsonb AS result"
)
_UNPROJECTED = "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = r.job_id)"
# A ledger row, and the same shape made of a recorded job (its ledger row pruned).
_REQUEST_COLUMNS = (
    "job_id, user_id, canvas_id, priority, query, options, idempotency_key, created_at, "
    "confirmed_at, correlation_id, resends, given_up_at"
)
_RECORDED_REQUEST_COLUMNS = (
    "id, user_id, canvas_id, priority, query, options, idempotency_key, created_at, "
    "created_at, '', 0, NULL::timestamptz"
)
_ACTIVE = [status.value for status in ACTIVE_STATUSES]
# A user's unfinished jobs: recorded ones (the jobs_user_active index: written out, the
# statuses match its predicate), and requests confirmed or still being published that the
# orchestrator has not recorded (the ledger's partial index on unrecorded rows). Neither
# part touches a job that ended, however many the user has.
_ACTIVE_JOBS = f"""
SELECT (SELECT count(*) FROM jobs
         WHERE user_id = $1
           AND status IN ({", ".join(f"'{status}'" for status in sorted(_ACTIVE))}))
     + (SELECT count(*) FROM gateway_job_requests r
         WHERE r.user_id = $1 AND r.recorded_at IS NULL AND r.given_up_at IS NULL
           AND (r.confirmed_at IS NOT NULL
                OR r.created_at > now() - make_interval(secs => $2))
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = r.job_id))
"""  # noqa: S608 (constants only)
_FINAL = frozenset(status.value for status in FINAL_STATUSES)
# A job's owner and status, its row share-locked: the orchestrator cannot record a start
# or a result for it until the caller's transaction ends.
_JOB_FOR_CANCEL = "SELECT user_id, status FROM jobs WHERE id = $1 FOR SHARE"
# The same for a request the orchestrator has not recorded yet.
_LEDGER_JOB = (
    "SELECT r.user_id, CASE WHEN r.given_up_at IS NULL THEN 'queued' ELSE 'failed' END "
    "AS status FROM gateway_job_requests r WHERE r.job_id = $1 AND r.confirmed_at IS NOT NULL"
)
# Queries are built from these constants only (hence the noqa: S608); values are always
# bound parameters.


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb in and out as Python objects."""
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def create_ledger(pool: asyncpg.Pool) -> None:
    """Create the ledger table (idempotent; safe when several gateways start at once)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('canvas-gateway:ledger'))")
        await conn.execute(LEDGER_DDL)


GIVEN_UP_ERROR = (
    "the job was never recorded by the job-orchestrator ({tries} tries); submit it again"
)


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
            ),
            correlation_id=correlation_id or self.correlation_id,
            job_id=self.job_id,
            user_id=self.user_id,
            canvas_id=self.canvas_id,
            occurred_at=self.created_at,
        )


@dataclass(frozen=True)
class Backlog:
    """What waits, as the health check reads it from the orchestrator's tables."""

    # Seconds since the longest-waiting queued job was queued (or dispatched); None when
    # no job is queued. Requests the orchestrator has not recorded yet are not counted:
    # its queue's depth and consumers tell about those.
    oldest_queued_age_seconds: float | None
    # Positions recorded but not yet published by the relay (max position - checkpoint).
    outbox_lag: int
    # Seconds the oldest of those has waited; None when the relay is caught up.
    oldest_unpublished_age_seconds: float | None


@dataclass(frozen=True)
class Admission:
    """The ledger row a request is answered with; ``duplicate`` when an earlier request
    with the same idempotency key made it."""

    request: JobRequest
    duplicate: bool


class Store:
    """The gateway's view of Postgres."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self.database.pool.acquire(timeout=5) as conn:
                yield conn
        except asyncpg.UndefinedTableError:
            raise StoreNotReady(
                "not ready: the job store does not exist yet (has the job-orchestrator started?)"
            ) from None
        except Exception as exc:
            # Away, restarting, read-only after a failover, out of disk: not the request's
            # fault, and nothing was written.
            if is_outage(exc):
                raise StoreUnavailable(
                    redact(f"database unavailable: {type(exc).__name__}")
                ) from None
            raise

    async def check(self) -> str | None:
        """None when the database answers, else why not."""
        return await self.database.check()

    # -- the ledger --------------------------------------------------------------------

    async def admit(
        self,
        *,
        job_id: UUID,
        user_id: str,
        canvas_id: str,
        canvas_given: bool,
        priority: int,
        query: str,
        options: dict[str, Any],
        idempotency_key: str | None,
        correlation_id: str,
        limit: int,
        in_flight_seconds: float,
    ) -> Admission:
        """Record a request in the ledger, or find the earlier one with the same key.

        Raises :class:`CanvasNotFound` when ``canvas_id`` is someone else's and
        :class:`LimitReached` when the user already has ``limit`` unfinished jobs.
        Requests still being published (inserted less than ``in_flight_seconds`` ago,
        unconfirmed) count towards the limit, so that a burst cannot pass it.
        """
        async with self._connection() as conn, conn.transaction():
            # One user's submissions go one at a time: the limit check and the key
            # lookup then see every earlier insert.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('canvas-gateway:user:' || $1, 0))",
                user_id,
            )
            if idempotency_key is not None:
                # The ledger row of the key, or, once that row was pruned (its job long
                # recorded), the job itself: the same answer either way.
                row = await conn.fetchrow(
                    f"""
                    SELECT {_REQUEST_COLUMNS} FROM gateway_job_requests
                     WHERE user_id = $1 AND idempotency_key = $2
                    UNION ALL
                    SELECT {_RECORDED_REQUEST_COLUMNS} FROM jobs
                     WHERE id = $3 AND user_id = $1
                    LIMIT 1
                    """,  # noqa: S608
                    user_id,
                    idempotency_key,
                    job_id,
                )
                if row is not None:
                    return Admission(_request(row), duplicate=True)
            if canvas_given and await _canvas_taken(conn, canvas_id, user_id):
                raise CanvasNotFound(canvas_id)
            active = await conn.fetchval(_ACTIVE_JOBS, user_id, in_flight_seconds)
            if active >= limit:
                raise LimitReached(active, limit)
            row = await conn.fetchrow(
                """
                INSERT INTO gateway_job_requests (job_id, user_id, canvas_id, priority, query,
                                                  options, idempotency_key, correlation_id,
                                                  created_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
                ON CONFLICT DO NOTHING
                RETURNING *
                """,
                job_id,
                user_id,
                canvas_id,
                priority,
                query,
                options,
                idempotency_key,
                correlation_id,
            )
            if row is None:  # the same key, inserted before the lock was taken
                row = await conn.fetchrow(
                    "SELECT * FROM gateway_job_requests WHERE job_id = $1", job_id
                )
                # Job ids of keyed requests are the user's own (job_id_for).
                assert row is not None
                assert row["user_id"] == user_id
                return Admission(_request(row), duplicate=True)
            return Admission(_request(row), duplicate=False)

    async def confirm(self, *job_ids: UUID) -> None:
        """The broker confirmed these JobRequested messages: the rows may now be shown."""
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE gateway_job_requests SET confirmed_at = now() "
                "WHERE job_id = ANY($1::uuid[]) AND confirmed_at IS NULL",
                list(job_ids),
            )

    async def claim_unrecorded(
        self, *, resend_after: float, max_resends: int, limit: int
    ) -> list[JobRequest]:
        """The accepted requests the orchestrator has not recorded, due to be sent again
        (``resend_after`` seconds after the last send, doubling with each try), claimed
        for this caller: their ``resends`` counted and ``last_sent_at`` set in the same
        statement, so that another gateway does not send them too. A request past
        ``max_resends`` comes back given up (``given_up_at`` set) instead.

        First marks the rows whose job was recorded meanwhile, so that each row is
        looked at only until its job is recorded."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE gateway_job_requests r SET recorded_at = now() FROM jobs j "
                "WHERE j.id = r.job_id AND r.recorded_at IS NULL AND r.given_up_at IS NULL"
            )
            rows = await conn.fetch(
                f"""
                WITH due AS (
                    SELECT r.job_id FROM gateway_job_requests r
                    WHERE r.recorded_at IS NULL AND r.given_up_at IS NULL
                      AND r.confirmed_at IS NOT NULL AND {_UNPROJECTED}
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
                """,  # noqa: S608
                resend_after,
                max_resends,
                limit,
                GIVEN_UP_ERROR.format(tries=max_resends + 1),
            )
        return [_request(row) for row in rows]

    async def discard(self, job_id: UUID) -> None:
        """Forget a request whose publish failed (never confirmed, so never shown)."""
        async with self._connection() as conn:
            await conn.execute(
                "DELETE FROM gateway_job_requests WHERE job_id = $1 AND confirmed_at IS NULL",
                job_id,
            )

    async def request_cancel(self, user_id: str, job_id: UUID, cancel: Envelope) -> str | None:
        """Record the user's cancel of ``job_id`` so that it wins over whatever the
        orchestrator records for the job next: None when the job is not the user's (or
        does not exist); the job's status when it is final already (nothing recorded);
        else ``"requested"``.

        The orchestrator reads the requests of a job once it holds the job's row lock
        (FOR UPDATE) or, before the job has a row, its recording lock, and applies them
        before any start or result. This transaction takes a share lock on the row, or
        the recording lock, so either it sees the job final, or the orchestrator sees the
        request: a 202 always wins (ARCHITECTURE.md 4)."""
        async with self._connection() as conn, conn.transaction():
            job = await conn.fetchrow(_JOB_FOR_CANCEL, job_id)
            if job is None:
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2::uuid::text))",
                    JOB_RECORDING_LOCK_CLASS,
                    job_id,
                )
                job = await conn.fetchrow(_JOB_FOR_CANCEL, job_id)
            if job is None:
                # Not recorded yet: the ledger's accepted request is the job.
                job = await conn.fetchrow(_LEDGER_JOB, job_id)
            if job is None or job["user_id"] != user_id:
                return None
            if job["status"] in _FINAL:
                return str(job["status"])
            await conn.execute(
                "INSERT INTO cancel_requests (job_id, envelope) VALUES ($1, $2) "
                "ON CONFLICT (job_id) DO NOTHING",
                job_id,
                cancel.model_dump(mode="json"),
            )
        return "requested"

    # -- reads -------------------------------------------------------------------------

    async def job(self, user_id: str, job_id: UUID) -> dict[str, Any] | None:
        """The user's job in the status answer's shape, projected or still pending."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"""
                SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1 AND user_id = $2
                UNION ALL
                SELECT {_PENDING_COLUMNS} FROM gateway_job_requests r
                 WHERE r.job_id = $1 AND r.user_id = $2 AND r.confirmed_at IS NOT NULL
                   AND {_UNPROJECTED}
                LIMIT 1
                """,  # noqa: S608
                job_id,
                user_id,
            )
        return dict(row) if row is not None else None

    async def jobs(
        self,
        user_id: str,
        *,
        status: JobStatus | None,
        after: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """A page of the user's jobs, newest first, after the cursor ``(created_at, id)``."""
        after_at, after_id = after if after is not None else (None, None)
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"""
                SELECT * FROM (
                    SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = $1
                    UNION ALL
                    SELECT {_PENDING_COLUMNS} FROM gateway_job_requests r
                     WHERE r.user_id = $1 AND r.confirmed_at IS NOT NULL
                       AND r.recorded_at IS NULL AND {_UNPROJECTED}
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

    async def events(self, user_id: str, job_id: UUID) -> list[dict[str, Any]] | None:
        """The user's job's stream in version order; None when it is not the user's job."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT type, version, position, occurred_at, data, user_id FROM events "
                "WHERE stream_id = $1 ORDER BY version",
                job_id,
            )
            if rows:
                if rows[0]["user_id"] != user_id:
                    return None
                return [{k: v for k, v in row.items() if k != "user_id"} for row in rows]
        # Accepted but not recorded yet: an empty stream, not a 404.
        return [] if await self.job(user_id, job_id) is not None else None

    async def canvas_objects(self, user_id: str, canvas_id: str) -> list[dict[str, Any]] | None:
        """The objects on the user's canvas in drawing order; None when it is not theirs."""
        async with self._connection() as conn:
            owner = await conn.fetchval("SELECT user_id FROM canvases WHERE id = $1", canvas_id)
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

    async def recent_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest jobs across all users (operators only). ``error_message`` is the
        last attempt's error: kept while a retried job waits again, cleared on success."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, user_id, canvas_id, status, created_at, updated_at, attempt, "
                "retry_count, next_attempt_at, error_message FROM jobs "
                "ORDER BY created_at DESC, id DESC LIMIT $1",
                limit,
            )
        return [dict(row) for row in rows]

    async def backlog(self) -> Backlog:
        """How long work waits: for a generator, and for the orchestrator's relay."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_BACKLOG)
        assert row is not None
        return Backlog(
            oldest_queued_age_seconds=_seconds(row["oldest_queued_age"]),
            outbox_lag=max(0, int(row["outbox_lag"])),
            oldest_unpublished_age_seconds=_seconds(row["oldest_unpublished_age"]),
        )

    async def job_counts(self) -> dict[str, int]:
        """How many jobs are in each status (operators only)."""
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        return {row["status"]: row["n"] for row in rows}


# One round trip, each part an index range scan: jobs_status for the queued jobs, the
# position index for the unpublished events. min() over relay_checkpoints rather than
# the orchestrator's checkpoint name, which the gateway should not need to know: there
# is one relay checkpoint, and with more the laggiest is the one that matters.
# clock_timestamp(), not now(): the statement's own time, not its transaction's.
_BACKLOG = """
WITH checkpoint AS (
    SELECT COALESCE((SELECT min(position) FROM relay_checkpoints), 0) AS position
)
SELECT
    (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(updated_at))
       FROM jobs WHERE status = 'queued') AS oldest_queued_age,
    COALESCE((SELECT max(position) FROM events), 0)
      - (SELECT position FROM checkpoint) AS outbox_lag,
    (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(recorded_at))
       FROM events WHERE position > (SELECT position FROM checkpoint)) AS oldest_unpublished_age
"""


def _seconds(value: Any) -> float | None:
    """An age in seconds, rounded to 0.1 s; never negative (a service's clock may be a
    little ahead of the database's)."""
    return None if value is None else max(0.0, round(float(value), 1))


async def _canvas_taken(conn: asyncpg.Connection, canvas_id: str, user_id: str) -> bool:
    """Whether another user drew on the canvas, or has a confirmed request for it."""
    owner = await conn.fetchval("SELECT user_id FROM canvases WHERE id = $1", canvas_id)
    if owner is not None:
        return bool(owner != user_id)
    other = await conn.fetchval(
        "SELECT 1 FROM gateway_job_requests WHERE canvas_id = $1 AND user_id <> $2 "
        "AND confirmed_at IS NOT NULL LIMIT 1",
        canvas_id,
        user_id,
    )
    return other is not None


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
    )
