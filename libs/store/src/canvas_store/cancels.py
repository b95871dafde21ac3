"""``cancel_requests``: a user's cancel, written by the gateway before it answers 202 and
applied by the job-orchestrator before it records anything else for the job.

Why a table and not only a message: a cancel answered 202 must win over a start or a
result the orchestrator is about to record, and over the job's own request when that is
still on its way. The gateway writes the request under a lock the orchestrator also
takes before it records anything for the job (a share lock on the job's row, or the
job's recording lock before it has one), so either the gateway sees the job final, or
the orchestrator sees the request. The orchestrator deletes a request once its job is
final.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final
from uuid import UUID

import asyncpg

from canvas_events.envelope import Envelope
from canvas_events.postgres import JOB_RECORDING_LOCK_CLASS
from canvas_store.status import FINAL_STATUSES

_FINAL: Final = frozenset(status.value for status in FINAL_STATUSES)
# A job's owner and status, its row share-locked: the orchestrator cannot record a start
# or a result for it until the caller's transaction ends.
_JOB_FOR_CANCEL: Final = "SELECT user_id, status FROM jobs WHERE id = $1 FOR SHARE"
# The same for a request the orchestrator has not recorded yet.
_LEDGER_JOB: Final = (
    "SELECT r.user_id, CASE WHEN r.given_up_at IS NULL THEN 'queued' ELSE 'failed' END "
    "AS status FROM gateway_job_requests r WHERE r.job_id = $1 AND r.confirmed_at IS NOT NULL"
)


async def request_cancel(
    conn: asyncpg.Connection, user_id: str, job_id: UUID, cancel: Envelope
) -> str | None:
    """Record ``user_id``'s cancel of ``job_id`` (inside the caller's transaction): None
    when the job is not the user's (or does not exist); the job's status when it is final
    already (nothing recorded); else ``"requested"``."""
    assert conn.is_in_transaction(), "a cancel request needs the caller's transaction"
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


async def pending(conn: asyncpg.Connection, job_ids: Sequence[UUID]) -> dict[UUID, Envelope]:
    """The JobCancelRequested envelopes waiting for ``job_ids`` (whose locks the caller
    holds)."""
    rows = await conn.fetch(
        "SELECT job_id, envelope FROM cancel_requests WHERE job_id = ANY($1::uuid[])",
        list(job_ids),
    )
    return {row["job_id"]: Envelope.model_validate(row["envelope"]) for row in rows}


async def keep(conn: asyncpg.Connection, requests: Sequence[tuple[UUID, Envelope]]) -> None:
    """Store cancels that arrived before their jobs were recorded (the first one of a job
    stays)."""
    if requests:
        await conn.execute(
            "INSERT INTO cancel_requests (job_id, envelope) "
            "SELECT * FROM unnest($1::uuid[], $2::jsonb[]) ON CONFLICT (job_id) DO NOTHING",
            [job_id for job_id, _ in requests],
            [envelope.model_dump(mode="json") for _, envelope in requests],
        )


async def clear(conn: asyncpg.Connection, job_ids: Sequence[UUID]) -> None:
    """Forget the requests of jobs that are final now."""
    if job_ids:
        await conn.execute(
            "DELETE FROM cancel_requests WHERE job_id = ANY($1::uuid[])", list(job_ids)
        )


_PRUNE: Final = """
DELETE FROM cancel_requests c USING jobs j
WHERE j.id = c.job_id AND j.status IN ('completed', 'failed', 'cancelled')
"""


async def prune(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """Delete the requests of jobs that ended (left by a crash between two statements);
    how many."""
    status = await conn.execute(_PRUNE)
    return int(status.rsplit(" ", 1)[-1])
