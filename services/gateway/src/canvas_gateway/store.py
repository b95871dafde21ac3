"""The gateway's view of Postgres: every read and write goes through canvas_store
(the gateway holds no SQL of its own), on a pooled connection, and an outage of the
database becomes :class:`StoreUnavailable` (503, nothing written).

Until the job-orchestrator has migrated the database, every call raises
:class:`StoreNotReady`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from canvas_events.batching import Batches
from canvas_events.envelope import Envelope
from canvas_events.logging import redact
from canvas_events.postgres import Database, is_outage
from canvas_gateway.errors import StoreNotReady, StoreUnavailable
from canvas_store import cancels, jobs, ledger, usage, views
from canvas_store.jobs import Backlog
from canvas_store.ledger import Admission, JobRequest, Limits
from canvas_store.status import JobStatus
from canvas_store.usage import Day, TokenBudget
from canvas_store.views import JobFilter

__all__ = [
    "Admission",
    "Backlog",
    "Day",
    "JobFilter",
    "JobRequest",
    "Limits",
    "Store",
    "TokenBudget",
]


class Store:
    """Typed reads and writes of canvas_store, with the gateway's error translation."""

    def __init__(self, database: Database) -> None:
        self.database = database
        # The confirms of requests published meanwhile go in one UPDATE (one commit).
        self._confirms: Batches[UUID, None] = Batches(
            self._confirm_all, max_batch=500, name="ledger-confirm"
        )

    @contextlib.asynccontextmanager
    async def _connection(self, *, transaction: bool = False) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self.database.pool.acquire(timeout=5) as conn:
                if not transaction:
                    yield conn
                    return
                async with conn.transaction():
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

    async def admit(self, request: JobRequest, *, canvas_given: bool, limits: Limits) -> Admission:
        """:func:`canvas_store.ledger.admit`: the request recorded, or the earlier one
        with its key; raises CanvasTaken, BudgetSpent or LimitReached."""
        async with self._connection(transaction=True) as conn:
            return await ledger.admit(conn, request, canvas_given=canvas_given, limits=limits)

    async def confirm(self, job_id: UUID) -> None:
        """The broker confirmed this request: it may now be shown. Confirms that wait
        together are written together."""
        await self._confirms.submit(job_id)

    async def confirm_all(self, job_ids: Sequence[UUID]) -> None:
        """The broker confirmed these requests: they may now be shown."""
        async with self._connection() as conn:
            await ledger.confirm(conn, list(job_ids))

    async def _confirm_all(self, job_ids: Sequence[UUID]) -> list[None]:
        await self.confirm_all(job_ids)
        return [None] * len(job_ids)

    async def claim_unrecorded(
        self, *, resend_after: float, max_resends: int, limit: int
    ) -> list[JobRequest]:
        """:func:`canvas_store.ledger.claim_unrecorded` in a transaction of its own."""
        async with self._connection(transaction=True) as conn:
            return await ledger.claim_unrecorded(
                conn, resend_after=resend_after, max_resends=max_resends, limit=limit
            )

    async def discard(self, job_id: UUID) -> None:
        """Forget a request whose publish failed (never confirmed, so never shown)."""
        async with self._connection() as conn:
            await ledger.discard(conn, job_id)

    async def request_cancel(self, user_id: str, job_id: UUID, cancel: Envelope) -> str | None:
        """:func:`canvas_store.cancels.request_cancel`: None when the job is not the
        user's, its status when final already, else ``"requested"`` (a 202 always
        wins)."""
        async with self._connection(transaction=True) as conn:
            return await cancels.request_cancel(conn, user_id, job_id, cancel)

    # -- reads -------------------------------------------------------------------------

    async def job(self, user_id: str | None, job_id: UUID) -> dict[str, Any] | None:
        """The user's job in the status answer's shape, recorded or still pending (any
        user's with ``user_id`` None)."""
        async with self._connection() as conn:
            return await views.job_view(conn, user_id, job_id)

    async def job_request(self, job_id: UUID) -> dict[str, Any] | None:
        """What a job was asked with, and whose it is; None when unknown."""
        async with self._connection() as conn:
            return await views.job_request(conn, job_id)

    async def all_jobs(
        self, where: JobFilter, *, after: tuple[datetime, UUID] | None, limit: int
    ) -> list[dict[str, Any]]:
        """A page of every user's jobs, newest first (operators only)."""
        async with self._connection() as conn:
            return await views.admin_job_page(conn, where, after=after, limit=limit)

    async def jobs(
        self,
        user_id: str,
        *,
        status: JobStatus | None,
        after: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """A page of the user's jobs, newest first, after the cursor ``(created_at, id)``."""
        async with self._connection() as conn:
            return await views.job_page(conn, user_id, status=status, after=after, limit=limit)

    async def events(self, user_id: str | None, job_id: UUID) -> list[dict[str, Any]] | None:
        """The user's job's stream in version order; None when it is not the user's job
        (any user's with ``user_id`` None)."""
        async with self._connection() as conn:
            return await views.job_history(conn, user_id, job_id)

    async def tokens_used(self, user_id: str, day: Day) -> int:
        """The tokens of the user's jobs completed in ``day``."""
        async with self._connection() as conn:
            return await usage.tokens_used(conn, user_id, day)

    async def canvas_objects(self, user_id: str, canvas_id: str) -> list[dict[str, Any]] | None:
        """The objects on the user's canvas in drawing order; None when it is not theirs."""
        async with self._connection() as conn:
            return await views.canvas_objects(conn, user_id, canvas_id)

    async def recent_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest jobs across all users (operators only)."""
        async with self._connection() as conn:
            return await jobs.recent_jobs(conn, limit)

    async def backlog(self) -> Backlog:
        """How long work waits: for a generator, and for the orchestrator's relay."""
        async with self._connection() as conn:
            return await jobs.backlog(conn)

    async def job_counts(self) -> dict[str, int]:
        """How many jobs are in each status (operators only)."""
        async with self._connection() as conn:
            return await jobs.job_counts(conn)
