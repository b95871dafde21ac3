"""An attempt's objects, published one by one while the model is still writing.

Each valid object found in the streamed reply becomes a GenerationProgressed, published
with a confirm by a task of its own, in index order: reading the stream never waits for
the broker, and the broker still sees index N before N+1 (one channel; what was found
while the last publish waited for its confirm goes out back to back, in order). The
attempt's result waits for :meth:`Progress.drain`, so that every progress event of an
attempt is confirmed before its GenerationSucceeded or GenerationFailed is published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from canvas_events.envelope import Envelope
from canvas_events.events import GenerationProgressed
from canvas_generator.metrics import Metrics

Publish = Callable[[Envelope], Awaitable[None]]


@dataclass(eq=False)
class Progress:
    """The GenerationProgressed events of one attempt, in order; see the module docstring.

    ``objects`` holds every object handed in, in index order: what the attempt's
    GenerationSucceeded must carry.
    """

    publish: Publish
    request: Envelope
    attempt_id: UUID
    run_id: UUID | None = None
    metrics: Metrics = field(kw_only=True)
    # What the first publish waits for (the attempt's GenerationStarted, confirmed); its
    # error is the progress's.
    after: Awaitable[None] | None = field(default=None, kw_only=True)
    # None ends the publishing task (drain); unbounded, as a reply holds at most a few
    # hundred objects.
    _queue: asyncio.Queue[tuple[Envelope, float] | None] = field(
        init=False, default_factory=asyncio.Queue
    )
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    objects: list[dict[str, Any]] = field(init=False, default_factory=list)

    def put(self, index: int, obj: dict[str, Any]) -> None:
        """Publish object ``index`` soon, without waiting. Raises the error of an earlier
        publish that failed (a :class:`~canvas_events.errors.PublishError`), so that an
        attempt whose progress cannot reach the broker stops reading the model."""
        if self._task is not None and self._task.done():
            self._task.result()
        if index != len(self.objects):
            raise ValueError(f"progress index {index} out of order: {len(self.objects)} expected")
        self.objects.append(obj)
        event = GenerationProgressed(
            attempt_id=self.attempt_id, index=index, object=obj, run_id=self.run_id
        )
        self._queue.put_nowait((self.request.follow(event), time.perf_counter()))
        if self._task is None:
            self._task = asyncio.create_task(self._work(), name=f"progress-{self.attempt_id}")

    async def _work(self) -> None:
        if self.after is not None:
            # Shielded: a cancelled progress (aclose) must not cancel what it waits for.
            await asyncio.shield(self.after)
        while True:
            # Everything found since the last publish goes out together: back to back on
            # the channel (in order), confirmed together. The orchestrator then receives
            # a burst, which it records in one transaction.
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            ready = [item for item in items if item is not None]
            results = await asyncio.gather(
                *(self.publish(envelope) for envelope, _ in ready), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            now = time.perf_counter()
            for _, found_at in ready:
                self.metrics.progress_publish_seconds.observe(now - found_at)
            if len(ready) < len(items):
                return  # drain() asked to stop: all before it is confirmed

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
