"""Whether an attempt taken from the work queue is still worth a model call.

A GenerationRequested can wait in the work queue while its job moves on: the user
cancels the job, or the attempt's lease expires and the orchestrator replaces it with a
new one. A model call for it would cost time and money for a result the orchestrator
ignores. So just before the call the worker checks, cheapest first:

1. the lease: once ``lease_expires_at`` has passed, the orchestrator's lease timer
   fails the attempt and dispatches a new one (or has done so already);
2. the cancels this process heard on its control queue (:mod:`canvas_generator.cancellations`);
3. the orchestrator, over HTTP (``GET /internal/attempts/{attempt_id}?job_id=``): the
   only way to learn of a cancel broadcast before this process was listening.

The third check fails open: when the orchestrator does not answer within
ORCHESTRATOR_TIMEOUT_SECONDS, or does not know the job, the attempt goes ahead. That is
safe because the orchestrator records only the current attempt's result, whatever the
generator does; a generator must not stall or drop work while the orchestrator's HTTP
side is away.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

import httpx

from canvas_events.auth import ServiceCredential


class SkipReason(StrEnum):
    """Why an attempt was dropped without a model call (label of
    canvas_generation_skipped_total)."""

    LEASE_EXPIRED = "lease_expired"  # past its lease: the orchestrator retries it itself
    CANCELLED = "cancelled"  # this process heard the job's cancel on its control queue
    NOT_CURRENT = "not_current"  # the orchestrator says the job no longer waits for it


class Verdict(StrEnum):
    """The orchestrator's word on an attempt."""

    CURRENT = "current"  # the job waits for this attempt: call the model
    NOT_CURRENT = "not_current"  # cancelled, superseded or ended: skip it
    UNKNOWN = "unknown"  # no usable answer: go ahead (fail-open)


@dataclass(frozen=True)
class AttemptCheck:
    """What the orchestrator said, with the job's status when it answered."""

    verdict: Verdict
    status: str | None = None
    detail: str | None = None  # why the verdict is UNKNOWN, for the log


def lease_expired(lease_expires_at: datetime, now: datetime) -> bool:
    """Whether an attempt's lease has run out at ``now`` (both timezone-aware)."""
    return lease_expires_at <= now


class AttemptChecker:
    """Asks the orchestrator whether attempts are current, over one shared HTTP client
    (its connections are kept alive between attempts)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        credential: ServiceCredential | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)
        # The internal API answers only the system's own services (docs/api.md).
        self._credential = credential

    async def check(self, job_id: UUID, attempt_id: UUID) -> AttemptCheck:
        """The orchestrator's verdict on ``attempt_id`` of ``job_id``; never raises for
        an orchestrator that is away or answers nonsense (UNKNOWN says why)."""
        try:
            response = await self._client.get(
                f"/internal/attempts/{attempt_id}",
                params={"job_id": str(job_id)},
                headers=self._credential.headers() if self._credential else None,
            )
        except httpx.HTTPError as exc:
            return AttemptCheck(Verdict.UNKNOWN, detail=f"orchestrator unreachable: {exc!r}")
        if response.status_code == 404:
            # A rebuild in progress, or ORCHESTRATOR_URL naming another installation: not
            # a reason to drop work.
            return AttemptCheck(Verdict.UNKNOWN, detail="orchestrator does not know the job")
        if response.status_code != 200:
            return AttemptCheck(
                Verdict.UNKNOWN, detail=f"orchestrator answered {response.status_code}"
            )
        try:
            body = response.json()
            current, status = body["current"], body.get("status")
        except (ValueError, KeyError, TypeError, AttributeError):
            return AttemptCheck(Verdict.UNKNOWN, detail="orchestrator's answer not understood")
        if not isinstance(current, bool):
            return AttemptCheck(Verdict.UNKNOWN, detail="orchestrator's answer not understood")
        return AttemptCheck(
            Verdict.CURRENT if current else Verdict.NOT_CURRENT,
            status=status if isinstance(status, str) else None,
        )

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()
