"""Cancels reaching this generator process, and the attempts in flight they abort.

Each generator process consumes a control queue of its own
(``<prefix>.ai-generator.control.<instance>``: exclusive, auto-delete, bound to
``job.JobCancelRequested`` and ``job.JobCancelled``), so every generator hears every
cancel the orchestrator recorded. A cancel does two things here:

- the job goes into :class:`RecentlyCancelled`, which the worker checks just before a
  model call: an attempt of that job still waiting in the work queue never reaches the
  model;
- an attempt of that job in its model call is cancelled (an asyncio cancel), which
  closes the call's HTTP connection, so the provider stops generating; the attempt then
  publishes nothing.

What this cannot know: a cancel broadcast while the process was not consuming its
control queue (not started yet, or reconnecting to the broker: the queue goes with its
connection, and the broker's stop drains work with the queue gone). The worker asks
the orchestrator for that (:mod:`canvas_generator.checks`), and the orchestrator
ignores a cancelled job's results in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import structlog
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import ACK, Consumer, DeadLetter, Outcome
from canvas_events.envelope import Envelope
from canvas_events.events import JobCancelled, JobCancelRequested, parse_event
from canvas_events.topology import Topology

log = structlog.get_logger("canvas_generator.cancellations")

# An attempt is skipped anyway once its lease (GENERATION_LEASE_SECONDS, 180 s by
# default) has run out, so a cancel need not be remembered much longer than that.
DEFAULT_TTL_SECONDS = 3600.0
# About 200 bytes an entry: a burst of 10,000 cancels costs 2 MB, and the oldest go first.
DEFAULT_MAX_ENTRIES = 10_000


class RecentlyCancelled:
    """Job ids cancelled lately: at most ``max_entries``, each for ``ttl_seconds``."""

    def __init__(
        self,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        # job id -> when it was cancelled, oldest first
        self._seen: OrderedDict[UUID, float] = OrderedDict()

    def add(self, job_id: UUID) -> None:
        """Remember that ``job_id`` was cancelled (again: the clock starts over)."""
        now = self._clock()
        self._seen.pop(job_id, None)
        self._seen[job_id] = now
        self._forget_old(now)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def __contains__(self, job_id: object) -> bool:
        self._forget_old(self._clock())
        return job_id in self._seen

    def __len__(self) -> int:
        self._forget_old(self._clock())
        return len(self._seen)

    def _forget_old(self, now: float) -> None:
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at < self._ttl:
                return
            del self._seen[oldest]


class Cancellations:
    """The control queue's consumer, and the attempts in flight it may cancel."""

    def __init__(
        self,
        topology: Topology,
        control_id: str,
        *,
        recent: RecentlyCancelled | None = None,
    ) -> None:
        self._topology = topology
        self.control_id = control_id
        self.recent = recent if recent is not None else RecentlyCancelled()
        # job id -> the tasks running a model call for it (two only when a superseded
        # attempt was handed out again while its successor runs here too)
        self._running: dict[UUID, set[asyncio.Task[Any]]] = {}

    def consumer(self) -> Consumer:
        """The consumer of this process's control queue."""
        return Consumer(
            queue=self._topology.generator_control(self.control_id), handler=self.handle
        )

    async def handle(self, envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        """Remember the cancelled job, and cancel its attempts in flight here."""
        event = parse_event(envelope)
        if not isinstance(event, JobCancelRequested | JobCancelled):
            log.warning("not a cancel; ignored", event_type=envelope.type)
            return ACK
        job_id = envelope.job_id
        if job_id is None:
            return DeadLetter(f"{envelope.type} without a job_id")
        # Both events of one cancel arrive (JobCancelRequested, then JobCancelled): the
        # second finds the work done (cancelling a task twice changes nothing) and says
        # nothing.
        first = job_id not in self.recent
        self.recent.add(job_id)
        tasks = self._running.get(job_id, set())
        for task in tasks:
            task.cancel()
        if first and tasks:
            log.info("cancelling attempt in flight", attempts=len(tasks))
        elif first:
            log.info("job cancelled; none of its attempts will call the model here")
        return ACK

    def is_cancelled(self, job_id: UUID) -> bool:
        """Whether this process heard that ``job_id`` was cancelled."""
        return job_id in self.recent

    @contextlib.contextmanager
    def track(self, job_id: UUID, task: asyncio.Task[Any]) -> Iterator[None]:
        """Within the block, a cancel of ``job_id`` cancels ``task``."""
        self._running.setdefault(job_id, set()).add(task)
        try:
            yield
        finally:
            running = self._running.get(job_id)
            if running is not None:
                running.discard(task)
                if not running:
                    del self._running[job_id]

    @property
    def in_flight(self) -> int:
        """Attempts in their model call that a cancel could abort."""
        return sum(len(tasks) for tasks in self._running.values())
