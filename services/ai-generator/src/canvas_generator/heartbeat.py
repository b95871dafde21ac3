"""What this generator announces of itself to the orchestrator, for fair dispatch
(docs/events.md, "Fair dispatch"): every HEARTBEAT_SECONDS it posts
``{generator_id, capacity, running}`` to ``POST /internal/generators/heartbeat``. The
orchestrator hands out only as many attempts as the generators announced (plus a little
headroom), so that what waits is chosen fairly among users, not first come first served.

``capacity`` is MAX_CONCURRENT_JOBS (the work queue's prefetch) while the broker is
connected, 0 while it is not (work could not reach this process) and when it stops. A
heartbeat that fails is logged and tried again at the next beat: the orchestrator
forgets a silent generator after a few beats, and with none announced it falls back to
a fixed capacity, so a lost heartbeat never stops the work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final

import httpx
import structlog

from canvas_events.auth import ServiceCredential
from canvas_events.runtime import Background

log = structlog.get_logger("canvas_generator.heartbeat")

HEARTBEAT_SECONDS: Final = 5.0


class Heartbeat(Background):
    """Announces this process's capacity to the orchestrator until stopped."""

    name = "heartbeat"

    def __init__(
        self,
        base_url: str,
        *,
        generator_id: str,
        capacity: Callable[[], int],
        running: Callable[[], int],
        timeout: float,
        credential: ServiceCredential | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        interval: float = HEARTBEAT_SECONDS,
    ) -> None:
        super().__init__()
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)
        self._credential = credential
        self.generator_id = generator_id
        self._capacity = capacity
        self._running = running
        self.interval = interval
        self._failing = False

    async def run(self) -> None:
        """Beat until stopped; then say this process takes no more work."""
        while True:
            await self.beat()
            if not await self.pause(self.interval):
                break
        with contextlib.suppress(Exception):
            await self.beat(capacity=0)
        await self._client.aclose()

    async def beat(self, *, capacity: int | None = None) -> bool:
        """Announce once; whether the orchestrator took it (never raises)."""
        body = {
            "generator_id": self.generator_id,
            "capacity": self._capacity() if capacity is None else capacity,
            "running": self._running(),
        }
        try:
            response = await self._client.post(
                "/internal/generators/heartbeat",
                json=body,
                headers=self._credential.headers() if self._credential else None,
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            if not self._failing:
                log.warning("heartbeat not taken; will try again", error=repr(exc))
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat taken again")
        self._failing = False
        return True
