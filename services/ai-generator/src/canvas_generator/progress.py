"""An attempt's objects, published one by one while the model is still writing.

Each valid object found in the streamed reply becomes a GenerationProgressed, published
with a confirm by a task of its own, in index order: reading the stream never waits for
the broker, and the broker still sees index N before N+1 (one channel, one message at a
time). The attempt's result waits for :meth:`Progress.drain`, so that every progress
event of an attempt is confirmed before its GenerationSucceeded or GenerationFailed is
published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from canvas_events.envelope import Envelope
from canvas_events.events import GenerationProgressed
from canvas_generator.metrics import PROGRESS_PUBLISH_SECONDS

Publish = Callable[[Envelope], Awaitable[None]]


class Progress:
    """The GenerationProgressed events of one attempt, in order; see the module docstring.

    ``objects`` holds every object handed in, in index order: what the attempt's
    GenerationSucceeded must carry.
    """

    def __init__(self, publish: Publish, request: Envelope, attempt_id: UUID) -> None:
        self._publish = publish
        self._request = request
        self._attempt_id = attempt_id
        # None ends the publishing task (drain); unbounded, as a reply holds at most a
        # few hundred objects.
        self._queue: asyncio.Queue[tuple[Envelope, float] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.objects: list[dict[str, Any]] = []

    def put(self, index: int, obj: dict[str, Any]) -> None:
        """Publish object ``index`` soon, without waiting. Raises the error of an earlier
        publish that failed (a :class:`~canvas_events.errors.PublishError`), so that an
        attempt whose progress cannot reach the broker stops reading the model."""
        if self._task is not None and self._task.done():
            self._task.result()
        if index != len(self.objects):
            raise ValueError(f"progress index {index} out of order: {len(self.objects)} expected")
        self.objects.append(obj)
        event = GenerationProgressed(attempt_id=self._attempt_id, index=index, object=obj)
        self._queue.put_nowait((self._request.follow(event), time.perf_counter()))
        if self._task is None:
            self._task = asyncio.create_task(self._work(), name=f"progress-{self._attempt_id}")

    async def _work(self) -> None:
        while (item := await self._queue.get()) is not None:
            envelope, found_at = item
            await self._publish(envelope)
            PROGRESS_PUBLISH_SECONDS.observe(time.perf_counter() - found_at)

    async def drain(self) -> None:
        """Return once every object handed in is confirmed by the broker; raises what a
        failed publish raised."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        await self._task

    async def aclose(self) -> None:
        """Drop what is not published yet (the attempt was cancelled, or ended without
        draining)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # wait(), not await: the task's own error or cancellation is not ours to raise,
        # while a cancel of the caller still is.
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved, or asyncio logs it as never retrieved
