"""What is kept only as long as it can matter, and pruned after.

- ``processed_messages``: one row per consumed message, so that a redelivery changes
  nothing. A message is redelivered within minutes (RabbitMQ's consumer timeout is 30),
  so a row older than PROCESSED_MESSAGES_RETENTION_SECONDS (a week) protects nothing;
  even a dead letter replayed later finds the job's state unmoved by it (every decision
  of the domain ignores what its state has seen).
- the gateway's ledger (``gateway_job_requests``): a row matters until its job is
  recorded (read-your-writes, the limit, the resend of an unrecorded job); a keyed
  request retried after its row went is answered from the job itself. Rows of recorded
  or given-up jobs, and of requests never confirmed, go after LEDGER_RETENTION_SECONDS.
  A confirmed request not recorded yet is never pruned: the ledger sweep still owes it.
- ``cancel_requests`` of jobs that ended, left by a crash between the two statements.

The event store itself is the record and is never pruned. Deletes go in batches, each its
own short transaction, so that pruning a year's backlog never holds a lock for long.
Every orchestrator prunes every PRUNE_INTERVAL_SECONDS (two at once only delete the same
rows twice); ``canvas-orchestrator prune`` does it once, now.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg
import structlog

from canvas_events.envelope import utcnow
from canvas_events.logging import redact
from canvas_events.postgres import Database
from canvas_events.runtime import Background
from canvas_store import cancels, ledger

log = structlog.get_logger("canvas_orchestrator.retention")

BATCH: Final = 10_000

_PRUNE_PROCESSED = """
DELETE FROM processed_messages WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM processed_messages WHERE processed_at < $1 LIMIT $2))
"""


@dataclass(frozen=True)
class Retention:
    """How long each kind of row is kept."""

    processed_messages: timedelta
    ledger: timedelta


@dataclass(frozen=True)
class Pruned:
    """Rows deleted by one prune."""

    processed_messages: int
    ledger: int
    cancel_requests: int


async def prune(pool: asyncpg.Pool, retention: Retention, *, now: datetime | None = None) -> Pruned:
    """Delete what ``retention`` no longer keeps; how many rows of each kind."""
    now = now or utcnow()
    processed = await _in_batches(pool, _prune_processed, now - retention.processed_messages)
    requests = await _in_batches(pool, ledger.prune, now - retention.ledger)
    return Pruned(processed, requests, await cancels.prune(pool))


async def _prune_processed(pool: asyncpg.Pool, before: datetime, limit: int) -> int:
    return _count(await pool.execute(_PRUNE_PROCESSED, before, limit))


async def _in_batches(
    pool: asyncpg.Pool,
    delete: Callable[[asyncpg.Pool, datetime, int], Awaitable[int]],
    before: datetime,
) -> int:
    """``delete`` BATCH rows at a time, each its own statement, until fewer are left."""
    deleted = 0
    while True:
        count = await delete(pool, before, BATCH)
        deleted += count
        if count < BATCH:
            return deleted


def _count(status: str) -> int:
    """The row count of a ``DELETE n`` status."""
    return int(status.rsplit(" ", 1)[-1])


class Pruner(Background):
    """Prunes every ``interval`` seconds in the background."""

    name = "pruner"

    def __init__(self, database: Database, retention: Retention, *, interval: float) -> None:
        self._database = database
        self._retention = retention
        self._interval = interval
        super().__init__()

    async def run(self) -> None:
        """Prune, then wait ``interval``; a stop lets a prune in hand finish (up to the
        stop's timeout)."""
        if not await self.unless_stopped(self._database.wait_ready()):
            return
        while True:
            try:
                pruned = await prune(self._database.pool, self._retention)
                if pruned.processed_messages or pruned.ledger or pruned.cancel_requests:
                    log.info(
                        "pruned",
                        processed_messages=pruned.processed_messages,
                        ledger=pruned.ledger,
                        cancel_requests=pruned.cancel_requests,
                    )
            except Exception as exc:
                log.warning("prune failed; will try again", error=redact(repr(exc)))
            if not await self.pause(self._interval):
                return
