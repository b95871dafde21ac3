"""The gateway's guarantee that an accepted job is not lost between the broker and the
orchestrator: the ledger sweep of each gateway process.

A 202 is answered once the broker confirmed the JobRequested; from there the broker
and the orchestrator carry it. What they cannot undo is an operator's purge, a
dead-lettered message, a deleted queue: the job would stay ``queued`` forever and count
against its user's limit. So, every few seconds, each gateway:

1. marks confirmed the requests whose confirm could not be written at the time (the
   database refused just after the broker confirmed): read-your-writes again;
2. claims the requests the orchestrator has not recorded LEDGER_RESEND_AFTER_SECONDS
   after they were sent (twice as long after each further try) and publishes their
   JobRequested again, same job id: the orchestrator records a job once, whatever the
   copies (``job request sent again`` in the log);
3. gives up a request after LEDGER_MAX_RESENDS tries: its status answers ``failed``
   with the reason, it stops counting against the limit, and a JobCancelRequested is
   sent after it, so that a copy still on its way is recorded cancelled, not run.

Claims are made with ``FOR UPDATE SKIP LOCKED`` in one statement, so several gateways
share the work without sending a request twice in one round.
"""

from __future__ import annotations

from typing import Final
from uuid import UUID

import structlog

from canvas_events.broker import Broker
from canvas_events.errors import PublishError
from canvas_events.events import JobCancelRequested
from canvas_events.logging import redact
from canvas_events.runtime import Background
from canvas_events.topology import GATEWAY, routing_key
from canvas_gateway.store import JobRequest, Store

log = structlog.get_logger("canvas_gateway.ledger")

# Requests claimed per round, at most.
BATCH: Final = 100


class LedgerSweep(Background):
    """The background loop described in the module docstring."""

    name = "ledger-sweep"

    def __init__(
        self, store: Store, broker: Broker, *, resend_after: float, max_resends: int
    ) -> None:
        self._store = store
        self._broker = broker
        self._resend_after = resend_after
        self._max_resends = max_resends
        # A sweep often enough that a request is sent again close to when it is due.
        self._interval = max(0.2, min(10.0, resend_after / 2))
        self._unconfirmed: set[UUID] = set()
        super().__init__()

    def confirm_later(self, job_id: UUID) -> None:
        """The broker confirmed ``job_id``'s request but the ledger could not be told:
        tell it as soon as the database lets us."""
        self._unconfirmed.add(job_id)

    async def run(self) -> None:
        """A round every interval until stopped."""
        while await self.pause(self._interval):
            try:
                await self.sweep()
            except Exception as exc:
                # The database or the broker away: the next round tries again.
                log.warning("ledger sweep failed; will try again", error=redact(repr(exc)))

    async def sweep(self) -> int:
        """One round; how many requests were sent again or given up."""
        if self._unconfirmed:
            pending = set(self._unconfirmed)
            await self._store.confirm_all(list(pending))
            self._unconfirmed -= pending
        claimed = await self._store.claim_unrecorded(
            resend_after=self._resend_after, max_resends=self._max_resends, limit=BATCH
        )
        for request in claimed:
            with structlog.contextvars.bound_contextvars(
                job_id=str(request.job_id), correlation_id=request.correlation_id
            ):
                await self._send(request)
        return len(claimed)

    async def _send(self, request: JobRequest) -> None:
        envelope = request.requested()
        if request.given_up_at is not None:
            log.error("job request given up", tries=request.resends)
            envelope = envelope.follow(
                JobCancelRequested(reason="given up: never recorded by the job-orchestrator")
            )
        try:
            await self._broker.publish(envelope, routing_key(GATEWAY, envelope.type))
        except PublishError as exc:
            # Claimed all the same: tried again after the next backoff.
            log.warning("job request could not be sent again", error=str(exc))
            return
        if request.given_up_at is None:
            log.warning("job request sent again", tries=request.resends)
