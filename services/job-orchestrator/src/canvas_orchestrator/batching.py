"""Group commit: what arrives while a transaction runs waits, and the next transaction
takes it all.

One task runs the batches one after another (several side by side, each for its share
of the jobs, measured slower: smaller batches cost more per message). A batch that lost
a race is run again; one that fails because the database is away fails every item in it
(none is at fault); one that fails for any other reason is split, a job and then an item
at a time, so that only the item at fault fails.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Final, TypeVar

import structlog

from canvas_events.batching import Batches, Waiting, fail, succeed

log = structlog.get_logger("canvas_orchestrator.batching")

T = TypeVar("T")
R = TypeVar("R")

MAX_CONFLICT_RETRIES: Final = 8


class KeptConflicting(Exception):
    """One job's batch lost the race under every try."""


class GroupCommit(Batches[T, R]):
    """Runs ``process`` over what was submitted meanwhile, a batch at a time (see
    :class:`canvas_events.batching.Batches`).

    ``process`` gets the batch in submission order and returns one result per item;
    ``key`` says which job an item is about; an error that is one of ``conflicts`` runs
    the batch again, one that ``is_outage`` says is the database's fails the whole batch.
    ``describe`` gives the log fields of a batch's lines (its job, or its jobs).
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
        describe: Callable[[Sequence[T]], dict[str, Any]] = lambda batch: {},
    ) -> None:
        super().__init__(process, max_batch=max_batch, name=name)
        self._key = key
        self._describe = describe
        self._conflicts = conflicts
        self._is_outage = is_outage

    async def _run(self, batch: list[Waiting[T, R]]) -> None:
        """Process ``batch``; every item's future gets its result or its error."""
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                results = await self._process([item.item for item in batch])
                break
            except self._conflicts as exc:
                log.info(
                    "a stream changed meanwhile; deciding again",
                    reason=type(exc).__name__,
                    **self._describe([item.item for item in batch]),
                )
            except Exception as exc:
                if self._is_outage(exc) or len(batch) == 1:
                    fail(batch, exc)
                    return
                log.warning(
                    "batch failed; handling its messages apart",
                    error=repr(exc),
                    **self._describe([item.item for item in batch]),
                )
                await self._split_and_run(batch)
                return
        else:
            keys = {self._key(item.item) for item in batch}
            if len(keys) > 1:
                # Only the items of the job whose stream keeps moving fail.
                await self._split_and_run(batch)
                return
            message = f"stream {keys.pop()} kept changing under {MAX_CONFLICT_RETRIES} tries"
            fail(batch, KeptConflicting(message))
            return
        succeed(batch, results)

    async def _split_and_run(self, batch: list[Waiting[T, R]]) -> None:
        """``batch`` a job at a time (in order of first item), or, for one job's, an item
        at a time."""
        by_key: dict[Hashable, list[Waiting[T, R]]] = {}
        for item in batch:
            by_key.setdefault(self._key(item.item), []).append(item)
        parts = list(by_key.values()) if len(by_key) > 1 else [[item] for item in batch]
        for part in parts:
            await self._run(part)
