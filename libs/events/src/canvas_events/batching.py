"""Work that arrives while a batch runs waits, and the next batch takes it all.

:class:`Batches` is the one mechanism behind the orchestrator's group commit (one
transaction for what arrived meanwhile) and the BatchPublisher (one message for what
was published meanwhile): one task runs the batches one after another, in submission
order, so an item that finds nothing running goes at once, alone, and items that
arrive while a batch runs travel together in the next one.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger("canvas_events.batching")

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Waiting(Generic[T, R]):
    """A submitted item and the future its submitter waits on."""

    item: T
    done: asyncio.Future[R]


class Batches(Generic[T, R]):
    """Runs ``process`` over what was submitted meanwhile, up to ``max_batch`` items a
    batch, in submission order; ``process`` returns one result per item, and an error
    it raises is every item's. Subclasses that decide per item override :meth:`_run`."""

    def __init__(
        self,
        process: Callable[[Sequence[T]], Awaitable[list[R]]],
        *,
        max_batch: int,
        name: str,
    ) -> None:
        self._process = process
        self._max_batch = max_batch
        self._name = name
        self._waiting: list[Waiting[T, R]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and wait for its result."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append(Waiting(item, done))
        if self._task is None:
            # A context of its own: the task serves many items, each logged by its own
            # submitter with its own correlation_id.
            self._task = asyncio.create_task(
                self._work(), name=self._name, context=contextvars.Context()
            )
        return await done

    def _take(self) -> list[Waiting[T, R]]:
        # A submitter cancelled meanwhile (shutdown) leaves its item out.
        waiting = [item for item in self._waiting if not item.done.done()]
        batch, self._waiting = waiting[: self._max_batch], waiting[self._max_batch :]
        return batch

    async def _work(self) -> None:
        try:
            # No await between the last empty take and leaving: an item queued after it
            # finds no task and starts one.
            while batch := self._take():
                try:
                    await self._run(batch)
                except Exception as exc:  # a bug: no submitter may wait for ever
                    log.exception("batch failed", name=self._name)
                    fail(batch, exc)
                except BaseException:
                    for item in batch:
                        item.done.cancel()
                    raise
        finally:
            self._task = None

    async def _run(self, batch: list[Waiting[T, R]]) -> None:
        """Process ``batch``; every item's future gets its result or the batch's error."""
        try:
            results = await self._process([item.item for item in batch])
        except Exception as exc:
            fail(batch, exc)
            return
        succeed(batch, results)


def succeed(batch: Sequence[Waiting[T, R]], results: Sequence[R]) -> None:
    """Hand each item of ``batch`` its result (those still waited for)."""
    for item, result in zip(batch, results, strict=True):
        if not item.done.done():
            item.done.set_result(result)


def fail(batch: Sequence[Waiting[T, R]], exc: BaseException) -> None:
    """Hand every item of ``batch`` still waited for the error ``exc``."""
    for item in batch:
        if not item.done.done():
            item.done.set_exception(exc)
