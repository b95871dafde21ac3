"""The job state machine, without I/O: state is a fold over a job's events, and each
decision takes the state and one incoming fact and returns the events to record.

An empty decision is normal: a duplicate, the result of an attempt that was superseded
(its lease expired, or the job was cancelled), anything after a final state. Time and
new ids come in as arguments, so every transition is a plain function call in tests.

An attempt may run more than once: handed out again when its generator's connection
dropped, it can run in two processes at a time. Each run names itself (``run_id``) in
what it sends; a GenerationStarted of another run takes the attempt over, and from then
on only that newest run's progress and result count (a fence, as leases with tokens
have): two runs never mix in a job's history.

    queued ──▶ processing ──▶ completed
      │  ▲         │
      │  └─ retry_scheduled ◀─┤ (retryable failure, retries left; or lease expired)
      │                       └─▶ failed (permanent failure, or no retries left)
      └──── any non-final state ──▶ cancelled
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any
from uuid import UUID, uuid4, uuid5

from canvas_events.events import (
    Event,
    GenerationFailed,
    GenerationProgressed,
    GenerationRequested,
    GenerationStarted,
    GenerationSucceeded,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobRequested,
    JobRetryScheduled,
)
from canvas_orchestrator.errors import UnexpectedEvent
from canvas_store.status import JobStatus

LEASE_EXPIRED_KIND = "lease_expired"
# The model said "too many requests" (429): the provider's limit, not the job's fault.
RATE_LIMITED_KIND = "rate_limited"
# Attempts of a job that a 429 may put off without counting a retry; after these the
# next ones count (a provider that never lets a job through must not hold it forever).
MAX_RATE_LIMIT_DEFERRALS = 10
LEASE_EXPIRED_ERROR = "attempt lease expired: no generator finished it in time"
NOT_STARTED_ERROR = "attempt not started in time: no generator took it from the queue"
CANVAS_NOT_FOUND_ERROR = "canvas not found"


# A result may arrive before its GenerationStarted (handled concurrently, or lost).
_RUNNING = frozenset({JobStatus.QUEUED, JobStatus.PROCESSING})


@dataclass(frozen=True)
class Policy:
    """Retry and lease rules (MAX_JOB_RETRIES, RETRY_BACKOFF_*, GENERATION_LEASE_SECONDS)."""

    max_retries: int = 3
    backoff_base: float = 2.0
    backoff_unit_seconds: float = 60.0
    lease_seconds: float = 180.0
    # A queued attempt waits in a durable queue and is not lost while it waits: it only
    # needs a deadline for the case where its message is (dead-lettered, purged). A
    # backlog must not expire attempts, so this is much longer than the running lease.
    start_timeout_seconds: float = 3600.0
    # Whether a 429 puts a job off without counting a retry (MAX_RATE_LIMIT_DEFERRALS
    # times): only with a fleet model budget (MODEL_*_PER_MINUTE), which pauses every
    # generator on a 429. Without one, a 429 is retried like any transient error, up
    # to max_retries (the contract's rule).
    defer_rate_limited: bool = False

    def backoff(self, retry_count: int) -> timedelta:
        """The wait before retry number ``retry_count + 1`` (the seed's 2^n minutes)."""
        return timedelta(seconds=self.backoff_unit_seconds * self.backoff_base**retry_count)

    def lease(self, now: datetime) -> datetime:
        """When an attempt a generator started at ``now`` is given up on."""
        return now + timedelta(seconds=self.lease_seconds)

    def start_deadline(self, now: datetime) -> datetime:
        """When an attempt dispatched at ``now`` and not started yet is given up on."""
        return now + timedelta(seconds=self.start_timeout_seconds)


@dataclass(frozen=True)
class JobState:
    """One job, as far as its events so far tell. ``version`` 0: no stream yet."""

    job_id: UUID
    version: int = 0
    status: JobStatus | None = None
    query: str = ""
    canvas_id: str = ""
    priority: int = 5
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    retry_count: int = 0
    attempt: int = 0
    attempt_id: UUID | None = None
    lease_expires_at: datetime | None = None
    next_attempt_at: datetime | None = None
    # Object indexes the current run has streamed, so a repeat is not recorded twice.
    progressed: frozenset[int] = frozenset()
    # The run of the current attempt whose events count (None: none known yet).
    run_id: UUID | None = None
    # Queued, and its next attempt not handed to the generators yet (fair dispatch).
    awaiting_dispatch: bool = False

    @property
    def exists(self) -> bool:
        """Whether the job was requested (its stream has events)."""
        return self.status is not None

    @property
    def is_final(self) -> bool:
        """Whether the job has ended."""
        return self.status is not None and self.status.is_final

    def is_current(self, attempt_id: UUID) -> bool:
        """Whether ``attempt_id`` is the attempt the job waits for (none while the job
        awaits the dispatch of its next one)."""
        return not self.awaiting_dispatch and self.attempt_id == attempt_id

    def counts(self, run_id: UUID | None) -> bool:
        """Whether an event of run ``run_id`` of the current attempt counts: it is the
        newest run, or no run is known yet on either side (the first event of a run
        pins it; the orchestrator's own verdicts name no run)."""
        return run_id is None or self.run_id is None or run_id == self.run_id


def evolve(state: JobState, event: Event) -> JobState:
    """The state after one more recorded event."""
    state = replace(state, version=state.version + 1)
    if isinstance(event, GenerationRequested | GenerationStarted | GenerationProgressed):
        return _attempt_evolved(state, event)
    return _job_evolved(state, event)


def _job_evolved(state: JobState, event: Event) -> JobState:
    """What an event about the job as a whole changes."""
    match event:
        case JobRequested():
            return replace(
                state,
                status=JobStatus.QUEUED,
                query=event.query,
                canvas_id=event.canvas_id,
                priority=event.priority,
                options=MappingProxyType(dict(event.options)),
            )
        case JobQueued():
            return replace(
                state,
                status=JobStatus.QUEUED,
                retry_count=event.retry_count,
                next_attempt_at=None,
                awaiting_dispatch=True,
            )
        case JobRetryScheduled():
            return replace(
                state,
                status=JobStatus.RETRY_SCHEDULED,
                retry_count=event.retry_count,
                next_attempt_at=event.next_attempt_at,
                lease_expires_at=None,
                awaiting_dispatch=False,
            )
        case JobCompleted():
            return replace(
                state, status=JobStatus.COMPLETED, lease_expires_at=None, awaiting_dispatch=False
            )
        case JobFailed():
            return replace(
                state,
                status=JobStatus.FAILED,
                retry_count=event.retry_count,
                lease_expires_at=None,
                next_attempt_at=None,
                awaiting_dispatch=False,
            )
        case JobCancelled():
            return replace(
                state,
                status=JobStatus.CANCELLED,
                lease_expires_at=None,
                next_attempt_at=None,
                awaiting_dispatch=False,
            )
        case _:
            # GenerationSucceeded, GenerationFailed, JobCancelRequested: the event that
            # follows them in the same decision carries the change.
            return state


def _attempt_evolved(
    state: JobState, event: GenerationRequested | GenerationStarted | GenerationProgressed
) -> JobState:
    """What an event about the current attempt changes."""
    match event:
        case GenerationRequested():
            return replace(
                state,
                attempt=event.attempt,
                attempt_id=event.attempt_id,
                lease_expires_at=event.lease_expires_at,
                progressed=frozenset(),
                run_id=None,
                awaiting_dispatch=False,
            )
        case GenerationStarted():
            # Another run taking the attempt over starts its objects from index 0.
            taken_over = state.run_id is not None and event.run_id != state.run_id
            return replace(
                state,
                status=JobStatus.PROCESSING,
                lease_expires_at=event.lease_expires_at or state.lease_expires_at,
                run_id=event.run_id if event.run_id is not None else state.run_id,
                progressed=frozenset() if taken_over else state.progressed,
            )
        case GenerationProgressed():
            return replace(
                state,
                progressed=state.progressed | {event.index},
                run_id=state.run_id if state.run_id is not None else event.run_id,
            )
    return state


def fold(job_id: UUID, events: Iterable[Event]) -> JobState:
    """The state of job ``job_id`` after ``events`` (its stream, in version order)."""
    state = JobState(job_id=job_id)
    for event in events:
        state = evolve(state, event)
    return state


def status_reached(event: Event) -> JobStatus | None:
    """The status a job enters with ``event``, if the event changes it."""
    return _STATUS_OF.get(type(event))


_STATUS_OF: dict[type[Event], JobStatus] = {
    JobQueued: JobStatus.QUEUED,
    GenerationStarted: JobStatus.PROCESSING,
    JobRetryScheduled: JobStatus.RETRY_SCHEDULED,
    JobCompleted: JobStatus.COMPLETED,
    JobFailed: JobStatus.FAILED,
    JobCancelled: JobStatus.CANCELLED,
}


def object_id(job_id: UUID, index: int) -> str:
    """The id of a job's ``index``-th object: the same on every replay and redelivery."""
    return str(uuid5(job_id, str(index)))


# -- decisions -------------------------------------------------------------------------

NewId = Callable[[], UUID]


def decide(
    state: JobState,
    event: Event,
    *,
    now: datetime,
    policy: Policy,
    new_id: NewId = uuid4,
    canvas_available: bool = True,
    cancelled_first: JobCancelRequested | None = None,
    dispatch_now: bool = True,
) -> list[Event]:
    """The events to record for an incoming ``event`` (from the gateway or a generator);
    ``cancelled_first``: a cancel of a JobRequested's job received before it;
    ``dispatch_now``: a new job's first attempt is handed out at once (False: the job
    awaits the dispatcher, see :func:`dispatch`).

    Raises :class:`UnexpectedEvent` for an event that only the orchestrator records.
    """
    match event:
        case JobRequested():
            return request(
                state,
                event,
                now=now,
                policy=policy,
                new_id=new_id,
                canvas_available=canvas_available,
                cancelled_first=cancelled_first,
                dispatch_now=dispatch_now,
            )
        case GenerationStarted():
            return start(state, event, now=now, policy=policy)
        case GenerationProgressed():
            return progress(state, event)
        case GenerationSucceeded():
            return succeed(state, event)
        case GenerationFailed():
            return fail(state, event, now=now, policy=policy)
        case JobCancelRequested():
            return cancel(state, event)
        case _:
            raise UnexpectedEvent(f"{event.type_name()} is not a command for the orchestrator")


def request(
    state: JobState,
    event: JobRequested,
    *,
    now: datetime,
    policy: Policy,
    new_id: NewId = uuid4,
    canvas_available: bool = True,
    cancelled_first: JobCancelRequested | None = None,
    dispatch_now: bool = True,
) -> list[Event]:
    """A new job: queue it and dispatch its first attempt (only queue it, awaiting
    dispatch, unless ``dispatch_now``); or, when its owner's cancel
    was received before it (``cancelled_first``: it overtook the request), record it
    cancelled, with no attempt. A known job: nothing (the gateway publishes the same job_id again
    for a repeated Idempotency-Key)."""
    if state.exists:
        return []
    if not canvas_available:
        return [event, JobFailed(error=CANVAS_NOT_FOUND_ERROR, retry_count=0)]
    if cancelled_first is not None:
        return [event, cancelled_first, JobCancelled(reason=cancelled_first.reason)]
    requested = evolve(state, event)
    return [event, *_queue(requested, now=now, policy=policy, new_id=new_id, now_too=dispatch_now)]


def start(
    state: JobState, event: GenerationStarted, *, now: datetime, policy: Policy
) -> list[Event]:
    """A generator took the current attempt: from now on it has the running lease. A
    start of another run of the attempt while it runs takes it over (the attempt was
    handed out again): the newest run counts from then on, with a new lease."""
    if not state.is_current(event.attempt_id):
        return []
    taking_over = (
        state.status is JobStatus.PROCESSING
        and event.run_id is not None
        and event.run_id != state.run_id
    )
    if state.status is JobStatus.QUEUED or taking_over:
        return [event.model_copy(update={"lease_expires_at": policy.lease(now)})]
    return []


def progress(state: JobState, event: GenerationProgressed) -> list[Event]:
    """One more object of the current attempt's newest run, once per index."""
    if (
        state.status in _RUNNING
        and state.is_current(event.attempt_id)
        and state.counts(event.run_id)
        and event.index not in state.progressed
    ):
        return [event]
    return []


def succeed(state: JobState, event: GenerationSucceeded) -> list[Event]:
    """The current attempt's newest run produced objects: the job is complete."""
    if (
        state.status not in _RUNNING
        or not state.is_current(event.attempt_id)
        or not state.counts(event.run_id)
    ):
        return []
    completed = JobCompleted(
        object_count=len(event.objects),
        object_ids=[object_id(state.job_id, index) for index in range(len(event.objects))],
        dropped_objects=event.dropped_objects,
        model=event.model,
        usage=event.usage,
        latency_ms=event.latency_ms,
    )
    return [event, completed]


def fail(state: JobState, event: GenerationFailed, *, now: datetime, policy: Policy) -> list[Event]:
    """The current attempt failed: retry later while retries are left and the error is
    transient, else the job fails with the generator's error. With a fleet model budget
    (``policy.defer_rate_limited``) a 429 puts the job off until its Retry-After without
    counting a retry, up to MAX_RATE_LIMIT_DEFERRALS times."""
    if (
        state.status not in _RUNNING
        or not state.is_current(event.attempt_id)
        or not state.counts(event.run_id)
    ):
        return []
    deferrals = state.attempt - 1 - state.retry_count  # attempts that counted no retry
    if (
        policy.defer_rate_limited
        and event.retryable
        and event.kind == RATE_LIMITED_KIND
        and deferrals < MAX_RATE_LIMIT_DEFERRALS
    ):
        # Put off, not retried: waiting for the provider's capacity burns no retry.
        wait = event.retry_after_seconds
        delay = timedelta(seconds=wait) if wait is not None else policy.backoff(0)
        deferred = JobRetryScheduled(
            retry_count=state.retry_count, next_attempt_at=now + delay, error=event.error
        )
        return [event, deferred]
    if event.retryable and state.retry_count < policy.max_retries:
        delay = policy.backoff(state.retry_count)
        if event.retry_after_seconds is not None:
            delay = max(delay, timedelta(seconds=event.retry_after_seconds))
        retry = JobRetryScheduled(
            retry_count=state.retry_count + 1, next_attempt_at=now + delay, error=event.error
        )
        return [event, retry]
    return [event, JobFailed(error=event.error, retry_count=state.retry_count)]


def cancel(state: JobState, event: JobCancelRequested) -> list[Event]:
    """Cancel a job that has not ended; a final job stays as it is (the gateway says 409)."""
    if not state.exists or state.is_final:
        return []
    return [event, JobCancelled(reason=event.reason)]


def retry_due(
    state: JobState,
    *,
    now: datetime,
    policy: Policy,
    new_id: NewId = uuid4,
    dispatch_now: bool = True,
) -> list[Event]:
    """A retry timer fired: queue the job again with a new attempt (only queue it,
    awaiting dispatch, unless ``dispatch_now``)."""
    if (
        state.status is not JobStatus.RETRY_SCHEDULED
        or state.next_attempt_at is None
        or state.next_attempt_at > now
    ):
        return []
    return _queue(state, now=now, policy=policy, new_id=new_id, now_too=dispatch_now)


def dispatch(
    state: JobState, *, now: datetime, policy: Policy, new_id: NewId = uuid4
) -> list[Event]:
    """The dispatcher hands a job that awaits dispatch its next attempt; nothing for a
    job that does not await it (dispatched meanwhile, cancelled, ended)."""
    if state.status is not JobStatus.QUEUED or not state.awaiting_dispatch:
        return []
    return [_attempt(state, now=now, policy=policy, new_id=new_id)]


def lease_expired(state: JobState, *, now: datetime, policy: Policy) -> list[Event]:
    """No generator started (queued) or finished (processing) the current attempt in
    time: fail it as a retryable error."""
    if (
        state.status not in _RUNNING
        or state.attempt_id is None
        or state.lease_expires_at is None
        or state.lease_expires_at >= now
    ):
        return []
    expired = GenerationFailed(
        attempt_id=state.attempt_id,
        error=LEASE_EXPIRED_ERROR if state.status is JobStatus.PROCESSING else NOT_STARTED_ERROR,
        kind=LEASE_EXPIRED_KIND,
        retryable=True,
    )
    return fail(state, expired, now=now, policy=policy)


def ignored_because(state: JobState, event: Event) -> str:
    """Why an incoming ``event`` changed nothing (for the log line)."""
    if not state.exists:
        return "unknown job"
    if isinstance(event, JobRequested):
        return "job already requested"
    if state.is_final:
        return f"job already {state.status.value if state.status else ''}"
    attempt_id = getattr(event, "attempt_id", None)
    if attempt_id is not None and not state.is_current(attempt_id):
        return "result of a superseded attempt"
    if not state.counts(getattr(event, "run_id", None)):
        return "from a run of the attempt that another run took over"
    if state.status is JobStatus.RETRY_SCHEDULED:
        return "attempt already given up (retry scheduled)"
    return f"duplicate while {state.status.value if state.status else 'unknown'}"


def _queue(
    state: JobState, *, now: datetime, policy: Policy, new_id: NewId, now_too: bool
) -> list[Event]:
    """Queue the job; with ``now_too``, hand out its next attempt in the same decision."""
    queued = JobQueued(priority=state.priority, retry_count=state.retry_count)
    if not now_too:
        return [queued]
    return [queued, _attempt(evolve(state, queued), now=now, policy=policy, new_id=new_id)]


def _attempt(
    state: JobState, *, now: datetime, policy: Policy, new_id: NewId
) -> GenerationRequested:
    return GenerationRequested(
        attempt_id=new_id(),
        attempt=state.attempt + 1,
        query=state.query,
        options=dict(state.options),
        priority=state.priority,
        lease_expires_at=policy.start_deadline(now),
    )
