"""Group commit: what arrives while a transaction runs waits, and the next transaction
takes it all.

One task runs the batches one after another (several side by side, each for its share
of the jobs, measured slower: smaller batches cost more per message). A batch that lost
a race is run again; one that fails because the database is away fails every item in it
(none is at fault); one that fails for any other reason is split, a job and then an item
at a time, so that only the item at fault fails.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import structlog

log = structlog.get_logger("canvas_orchestrator.batching")

T = TypeVar("T")
R = TypeVar("R")

MAX_CONFLICT_RETRIES: Final = 8


class KeptConflicting(Exception):
    """One job's batch lost the race under every try."""


@dataclass
class _Waiting(Generic[T, R]):
    item: T
    key: Hashable
    done: asyncio.Future[R]


class GroupCommit(Generic[T, R]):
    """Runs ``process`` over what was submitted meanwhile, a batch at a time.

    ``process`` gets the batch in submission order and returns one result per item;
    ``key`` says which job an item is about; an error that is one of ``conflicts`` runs
    the batch again, one that ``is_outage`` says is the database's fails the whole batch.
    """

    def __init__(
        self,
        process: Callable[[Sequence[T]], Awaitable[list[R]]],
        *,
        key: Callable[[T], Hashable],
        conflicts: tuple[type[BaseException], ...],
        is_outage: Callable[[BaseException], bool],
        max_batch: int,
        name: str,
    ) -> None:
        self._process = process
        self._key = key
        self._conflicts = conflicts
        self._is_outage = is_outage
        self._max_batch = max_batch
        self._name = name
        self._waiting: list[_Waiting[T, R]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and wait for its result."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(item, self._key(item), done))
        if self._task is None:
            # A context of its own: the task serves many items, each logged by its own
            # submitter with its own correlation_id.
            self._task = asyncio.create_task(
                self._work(), name=self._name, context=contextvars.Context()
            )
        return await done

    def _take(self) -> list[_Waiting[T, R]]:
        # A submitter cancelled meanwhile (shutdown) leaves its message unacked.
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
                    log.exception("group commit failed", name=self._name)
                    _fail(batch, exc)
                except BaseException:
                    for item in batch:
                        item.done.cancel()
                    raise
        finally:
            self._task = None

    async def _run(self, batch: list[_Waiting[T, R]]) -> None:
        """Process ``batch``; every item's future gets its result or its error."""
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                results = await self._process([item.item for item in batch])
                break
            except self._conflicts as exc:
                log.info("a stream changed meanwhile; deciding again", reason=type(exc).__name__)
            except Exception as exc:
                if self._is_outage(exc) or len(batch) == 1:
                    _fail(batch, exc)
                    return
                log.warning("batch failed; handling its messages apart", error=repr(exc))
                await self._split_and_run(batch)
                return
        else:
            if len({item.key for item in batch}) > 1:
                # Only the items of the job whose stream keeps moving fail.
                await self._split_and_run(batch)
                return
            message = f"stream {batch[0].key} kept changing under {MAX_CONFLICT_RETRIES} tries"
            _fail(batch, KeptConflicting(message))
            return
        for item, result in zip(batch, results, strict=True):
            if not item.done.done():
                item.done.set_result(result)

    async def _split_and_run(self, batch: list[_Waiting[T, R]]) -> None:
        """``batch`` a job at a time (in order of first item), or, for one job's, an item
        at a time."""
        by_key: dict[Hashable, list[_Waiting[T, R]]] = {}
        for item in batch:
            by_key.setdefault(item.key, []).append(item)
        parts = list(by_key.values()) if len(by_key) > 1 else [[item] for item in batch]
        for part in parts:
            await self._run(part)


def _fail(batch: Sequence[_Waiting[T, R]], exc: BaseException) -> None:
    for item in batch:
        if not item.done.done():
            item.done.set_exception(exc)
