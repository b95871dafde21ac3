"""The fleet's model budget, as one generator keeps to it.

While MODEL_REQUESTS_PER_MINUTE or MODEL_TOKENS_PER_MINUTE is set, every model call
waits for a permit from the orchestrator (``POST /internal/model-budget/permits``),
which counts the calls of every generator together (canvas_store.budget). The wait
comes before GenerationStarted: a waiting attempt is still queued for its job (its
start deadline is an hour, not the running lease), burns no retry, and a cancel of its
job ends the wait. A 429 with Retry-After from the model pauses the fleet's calls to it
(``POST /internal/model-budget/pauses``), and each call reports its real usage so that
the token window counts it instead of the estimate.

The wait fails closed: while the orchestrator cannot answer, no call goes out (the
budget is a promise to the provider); it is asked again every second. Without a limit
set none of this runs, and a 429 only fails its own attempt (retried after its
Retry-After, as every retryable failure is).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import httpx
import structlog

from canvas_events.auth import ServiceCredential

log = structlog.get_logger("canvas_generator.budget")

# Longest single wait before asking again: a permit refused for a while may come free
# sooner (another generator's call reported fewer tokens than its estimate).
MAX_WAIT_SECONDS = 5.0
# Between tries while the orchestrator does not answer.
UNREACHABLE_RETRY_SECONDS = 1.0
# Characters per token, for a call's estimate before its usage is known.
CHARS_PER_TOKEN = 4


def estimate_tokens(prompt_chars: int, completion_tokens: int) -> int:
    """A call's tokens before it is made: its prompt's, and what a reply usually takes."""
    return prompt_chars // CHARS_PER_TOKEN + completion_tokens


@dataclass(frozen=True)
class Waited:
    """How a wait for a permit ended."""

    granted: bool  # False: the job was cancelled meanwhile
    seconds: float
    # Why it waited, the last time it was refused (None: granted at once).
    reason: str | None = None


class FleetBudget:
    """The permits of one generator process, asked of the orchestrator."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        timeout: float,
        credential: ServiceCredential | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        completion_estimate: int = 800,
    ) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)
        self._credential = credential
        self.model = model
        self.completion_estimate = completion_estimate

    def _headers(self) -> dict[str, str] | None:
        return self._credential.headers() if self._credential else None

    async def permit(
        self,
        attempt_id: UUID,
        run_id: UUID,
        *,
        prompt_chars: int,
        cancelled: Callable[[], bool],
    ) -> Waited:
        """Wait until this run may call the model, or until ``cancelled()`` says its job
        was cancelled."""
        began = time.monotonic()
        body = {
            "model": self.model,
            "attempt_id": str(attempt_id),
            "run_id": str(run_id),
            "estimated_tokens": estimate_tokens(prompt_chars, self.completion_estimate),
        }
        reason: str | None = None
        while not cancelled():
            wait, refused = await self._ask(body)
            if refused is None:
                return Waited(True, time.monotonic() - began, reason)
            if reason != refused:
                log.info("waiting for model capacity", reason=refused, retry_in_seconds=wait)
            reason = refused
            await asyncio.sleep(min(wait, MAX_WAIT_SECONDS))
        return Waited(False, time.monotonic() - began, reason)

    async def _ask(self, body: dict[str, object]) -> tuple[float, str | None]:
        """(seconds to wait, why) for a refusal; (0, None) for a permit."""
        try:
            response = await self._client.post(
                "/internal/model-budget/permits", json=body, headers=self._headers()
            )
            response.raise_for_status()
            answer = response.json()
            if answer["granted"] is True:
                return 0.0, None
            return max(0.05, float(answer["retry_in_seconds"])), str(answer["reason"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("model budget unavailable; waiting", error=repr(exc))
            return UNREACHABLE_RETRY_SECONDS, "orchestrator_unreachable"

    async def report(self, attempt_id: UUID, run_id: UUID, tokens: int) -> None:
        """The tokens a granted call used (best effort: the estimate stays otherwise)."""
        body = {"attempt_id": str(attempt_id), "run_id": str(run_id), "tokens": tokens}
        try:
            response = await self._client.post(
                "/internal/model-budget/usage", json=body, headers=self._headers()
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("model usage not reported", error=repr(exc), tokens=tokens)

    async def pause(self, seconds: float) -> None:
        """Ask the fleet to send this model nothing for ``seconds`` (a 429's Retry-After)."""
        body = {"model": self.model, "seconds": seconds}
        try:
            response = await self._client.post(
                "/internal/model-budget/pauses", json=body, headers=self._headers()
            )
            response.raise_for_status()
            log.warning("model asked us to slow down; fleet paused", seconds=seconds)
        except httpx.HTTPError as exc:
            log.warning("fleet pause not recorded", error=repr(exc), seconds=seconds)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()
