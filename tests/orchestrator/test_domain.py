"""The job state machine as plain function calls: no database, no broker, no clock."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4, uuid5

import pytest

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
from canvas_orchestrator import domain
from canvas_orchestrator.domain import (
    MAX_RATE_LIMIT_DEFERRALS,
    RATE_LIMITED_KIND,
    JobState,
    Policy,
)
from canvas_orchestrator.errors import UnexpectedEvent
from canvas_store.status import JobStatus

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
JOB_ID = UUID("00000000-0000-4000-8000-000000000001")
POLICY = Policy(
    max_retries=3,
    backoff_base=2,
    backoff_unit_seconds=60,
    lease_seconds=180,
    start_timeout_seconds=3600,
)
REQUEST = JobRequested(query="a login flowchart", canvas_id="canvas-1", priority=7)
OBJECTS = [
    {"type": "rectangle", "x": 0, "y": 0, "width": 10, "height": 10},
    {"type": "circle", "x": 5, "y": 5, "radius": 2},
]


def sequential_ids():
    counter = itertools.count(1)
    return lambda: UUID(int=next(counter))


def decide(state: JobState, event: Event, *, now: datetime = NOW, **kwargs) -> list[Event]:
    return domain.decide(state, event, now=now, policy=POLICY, **kwargs)


def apply(state: JobState, events: list[Event]) -> JobState:
    for event in events:
        state = domain.evolve(state, event)
    return state


def requested(new_id=None) -> JobState:
    state = JobState(job_id=JOB_ID)
    return apply(state, decide(state, REQUEST, new_id=new_id or sequential_ids()))


def started() -> JobState:
    state = requested()
    return apply(state, decide(state, _started(state)))


def _started(state: JobState) -> GenerationStarted:
    assert state.attempt_id is not None
    return GenerationStarted(attempt_id=state.attempt_id, model="m", generator_id="g1")


def _succeeded(attempt_id: UUID | None) -> GenerationSucceeded:
    assert attempt_id is not None
    return GenerationSucceeded(
        attempt_id=attempt_id,
        objects=OBJECTS,
        dropped_objects=1,
        model="m",
        usage={"total_tokens": 42},
        latency_ms=1200,
    )


def _failed(
    attempt_id: UUID | None, *, retryable: bool, retry_after: float | None = None
) -> GenerationFailed:
    assert attempt_id is not None
    return GenerationFailed(
        attempt_id=attempt_id,
        error="model timed out" if retryable else "invalid API key",
        kind="timeout" if retryable else "auth",
        retryable=retryable,
        retry_after_seconds=retry_after,
    )


def failed_retryably(state: JobState, times: int) -> JobState:
    """Fail the current attempt and fire the retry timer, ``times`` times."""
    for _ in range(times):
        state = apply(state, decide(state, _failed(state.attempt_id, retryable=True)))
        assert state.next_attempt_at is not None
        state = apply(
            state, domain.retry_due(state, now=state.next_attempt_at, policy=POLICY, new_id=uuid4)
        )
    return state


# -- a new job ----------------------------------------------------------------------


def test_new_job_is_queued_and_its_first_attempt_dispatched_with_a_start_deadline():
    events = decide(JobState(job_id=JOB_ID), REQUEST, new_id=lambda: UUID(int=9))

    assert [type(event) for event in events] == [JobRequested, JobQueued, GenerationRequested]
    assert events[0] is REQUEST
    assert events[1] == JobQueued(priority=7, retry_count=0)
    dispatched = events[2]
    assert isinstance(dispatched, GenerationRequested)
    assert dispatched.attempt == 1
    assert dispatched.attempt_id == UUID(int=9)
    assert dispatched.query == REQUEST.query
    assert dispatched.priority == 7
    # Waiting in the queue is not running: a backlog gets the long start deadline.
    assert dispatched.lease_expires_at == NOW + timedelta(seconds=3600)


def test_new_job_state_is_queued_with_the_attempt_it_waits_for():
    state = requested(new_id=lambda: UUID(int=9))

    assert state.status is JobStatus.QUEUED
    assert state.version == 3
    assert state.attempt == 1
    assert state.attempt_id == UUID(int=9)
    assert state.canvas_id == "canvas-1"
    assert state.retry_count == 0


def test_repeated_job_request_records_nothing():
    assert decide(requested(), REQUEST) == []


def test_job_on_someone_elses_canvas_fails_with_canvas_not_found():
    events = decide(JobState(job_id=JOB_ID), REQUEST, canvas_available=False)

    assert events == [REQUEST, JobFailed(error="canvas not found", retry_count=0)]
    assert apply(JobState(job_id=JOB_ID), events).status is JobStatus.FAILED


# -- an attempt runs -----------------------------------------------------------------


def test_start_of_the_current_attempt_moves_the_job_to_processing_with_a_running_lease():
    state = requested()
    event = _started(state)
    later = NOW + timedelta(minutes=30)

    recorded = decide(state, event, now=later)

    assert recorded == [
        event.model_copy(update={"lease_expires_at": later + timedelta(seconds=180)})
    ]
    after = apply(state, recorded)
    assert after.status is JobStatus.PROCESSING
    assert after.lease_expires_at == later + timedelta(seconds=180)


def test_duplicate_start_records_nothing():
    state = started()

    assert decide(state, _started(state)) == []


def test_start_of_an_unknown_attempt_records_nothing():
    event = GenerationStarted(attempt_id=uuid4(), model="m", generator_id="g")

    assert decide(requested(), event) == []


def test_start_for_an_unknown_job_records_nothing():
    event = GenerationStarted(attempt_id=uuid4(), model="m", generator_id="g")

    assert decide(JobState(job_id=JOB_ID), event) == []


def test_progress_is_recorded_once_per_object_index():
    state = started()
    assert state.attempt_id is not None
    first = GenerationProgressed(attempt_id=state.attempt_id, index=0, object=OBJECTS[0])

    assert decide(state, first) == [first]
    state = domain.evolve(state, first)
    assert decide(state, first) == []
    second = GenerationProgressed(attempt_id=state.attempt_id, index=1, object=OBJECTS[1])
    assert decide(state, second) == [second]


# -- runs of one attempt -----------------------------------------------------------------

RUN_A = UUID("00000000-0000-4000-8000-00000000000a")
RUN_B = UUID("00000000-0000-4000-8000-00000000000b")


def _run_started(state: JobState, run_id: UUID) -> GenerationStarted:
    return _started(state).model_copy(update={"run_id": run_id})


def _progress(state: JobState, index: int, run_id: UUID) -> GenerationProgressed:
    assert state.attempt_id is not None
    return GenerationProgressed(
        attempt_id=state.attempt_id, index=index, object=OBJECTS[0], run_id=run_id
    )


def test_start_of_another_run_takes_the_running_attempt_over_with_a_new_lease():
    state = requested()
    state = apply(state, decide(state, _run_started(state, RUN_A)))
    state = apply(state, decide(state, _progress(state, 0, RUN_A)))

    later = NOW + timedelta(seconds=30)
    events = decide(state, _run_started(state, RUN_B), now=later)

    assert len(events) == 1
    assert events[0].lease_expires_at == later + timedelta(seconds=180)  # type: ignore[attr-defined]
    state = apply(state, events)
    assert state.run_id == RUN_B
    assert state.progressed == frozenset()  # the new run draws from index 0 again
    # The same run starting again (a redelivered start) changes nothing.
    assert decide(state, _run_started(state, RUN_B)) == []


def test_progress_and_results_of_a_run_taken_over_are_not_recorded():
    state = requested()
    state = apply(state, decide(state, _run_started(state, RUN_A)))
    state = apply(state, decide(state, _run_started(state, RUN_B)))

    assert decide(state, _progress(state, 0, RUN_A)) == []
    old = _succeeded(state.attempt_id).model_copy(update={"run_id": RUN_A})
    assert decide(state, old) == []
    assert domain.ignored_because(state, old) == (
        "from a run of the attempt that another run took over"
    )
    failure = _failed(state.attempt_id, retryable=True).model_copy(update={"run_id": RUN_A})
    assert decide(state, failure) == []
    newest = _succeeded(state.attempt_id).model_copy(update={"run_id": RUN_B})
    assert [e.type_name() for e in decide(state, newest)] == ["GenerationSucceeded", "JobCompleted"]


def test_progress_before_its_start_pins_its_run_and_the_start_then_keeps_it():
    state = requested()
    state = apply(state, decide(state, _progress(state, 0, RUN_A)))
    assert state.run_id == RUN_A

    state = apply(state, decide(state, _run_started(state, RUN_A)))

    assert state.status is JobStatus.PROCESSING
    assert state.progressed == frozenset({0})
    assert decide(state, _progress(state, 0, RUN_A)) == []


def test_an_expired_lease_fails_the_attempt_whichever_run_holds_it():
    state = requested()
    state = apply(state, decide(state, _run_started(state, RUN_A)))
    assert state.lease_expires_at is not None

    events = domain.lease_expired(
        state, now=state.lease_expires_at + timedelta(seconds=1), policy=POLICY
    )

    assert [e.type_name() for e in events] == ["GenerationFailed", "JobRetryScheduled"]


def test_progress_of_a_superseded_attempt_records_nothing():
    state = started()
    event = GenerationProgressed(attempt_id=uuid4(), index=0, object=OBJECTS[0])

    assert decide(state, event) == []


def test_success_completes_the_job_with_object_ids_derived_from_the_job():
    state = started()
    event = _succeeded(state.attempt_id)

    events = decide(state, event)

    assert events == [
        event,
        JobCompleted(
            object_count=2,
            object_ids=[str(uuid5(JOB_ID, "0")), str(uuid5(JOB_ID, "1"))],
            dropped_objects=1,
            model="m",
            usage={"total_tokens": 42},
            latency_ms=1200,
        ),
    ]
    assert apply(state, events).status is JobStatus.COMPLETED


def test_success_that_arrives_before_its_start_still_completes_the_job():
    state = requested()

    events = decide(state, _succeeded(state.attempt_id))

    assert [event.type_name() for event in events] == ["GenerationSucceeded", "JobCompleted"]


def test_duplicate_success_records_nothing():
    state = started()
    event = _succeeded(state.attempt_id)
    state = apply(state, decide(state, event))

    assert decide(state, event) == []


# -- failures and retries -------------------------------------------------------------


def test_retryable_failure_schedules_a_retry_after_the_first_backoff_unit():
    state = started()
    event = _failed(state.attempt_id, retryable=True)

    events = decide(state, event)

    assert events == [
        event,
        JobRetryScheduled(
            retry_count=1, next_attempt_at=NOW + timedelta(seconds=60), error="model timed out"
        ),
    ]
    after = apply(state, events)
    assert after.status is JobStatus.RETRY_SCHEDULED
    assert after.retry_count == 1
    assert after.lease_expires_at is None


def test_backoff_grows_by_the_base_with_each_retry():
    state = failed_retryably(started(), 2)

    events = decide(state, _failed(state.attempt_id, retryable=True))

    retry = events[1]
    assert isinstance(retry, JobRetryScheduled)
    assert retry.retry_count == 3
    assert retry.next_attempt_at == NOW + timedelta(seconds=60 * 2**2)


@pytest.mark.parametrize(
    ("retry_after", "wait"),
    [
        pytest.param(600, 600, id="longer-retry-after-honoured"),
        pytest.param(5, 60, id="shorter-retry-after-keeps-the-backoff"),
    ],
)
def test_a_retry_waits_the_longer_of_the_retry_after_and_the_backoff(retry_after, wait):
    state = started()

    events = decide(state, _failed(state.attempt_id, retryable=True, retry_after=retry_after))

    retry = events[1]
    assert isinstance(retry, JobRetryScheduled)
    assert retry.next_attempt_at == NOW + timedelta(seconds=wait)


def _rate_limited(attempt_id: UUID | None, retry_after: float | None = 5) -> GenerationFailed:
    assert attempt_id is not None
    return GenerationFailed(
        attempt_id=attempt_id,
        error="OpenAI rate limit (429)",
        kind=RATE_LIMITED_KIND,
        retryable=True,
        retry_after_seconds=retry_after,
    )


# A fleet model budget is set: a 429 is the fleet's to wait out.
BUDGETED = replace(POLICY, defer_rate_limited=True)


def test_with_a_fleet_budget_a_429_puts_the_job_off_without_counting_a_retry():
    state = failed_retryably(started(), 1)
    event = _rate_limited(state.attempt_id, retry_after=5)

    events = domain.decide(state, event, now=NOW, policy=BUDGETED)

    # Sooner than the backoff (120 s now): the provider said when.
    assert events == [
        event,
        JobRetryScheduled(
            retry_count=1, next_attempt_at=NOW + timedelta(seconds=5), error=event.error
        ),
    ]
    after = apply(state, events)
    assert (after.status, after.retry_count) == (JobStatus.RETRY_SCHEDULED, 1)


def test_429s_without_end_count_as_retries_after_the_deferrals_run_out():
    state = started()
    later = NOW + timedelta(hours=1)
    for _ in range(MAX_RATE_LIMIT_DEFERRALS):
        failed = _rate_limited(state.attempt_id)
        state = apply(state, domain.decide(state, failed, now=NOW, policy=BUDGETED))
        state = apply(state, domain.retry_due(state, now=later, policy=BUDGETED))
        state = apply(state, decide(state, _started(state)))
    assert state.retry_count == 0

    failed = _rate_limited(state.attempt_id, retry_after=None)
    retry = domain.decide(state, failed, now=NOW, policy=BUDGETED)[1]

    assert isinstance(retry, JobRetryScheduled)
    assert retry.retry_count == 1
    assert retry.next_attempt_at == NOW + timedelta(seconds=60)


def test_without_a_fleet_budget_a_429_counts_as_a_retry_as_any_transient_error():
    state = started()

    retry = decide(state, _rate_limited(state.attempt_id, retry_after=5))[1]

    assert isinstance(retry, JobRetryScheduled)
    assert retry.retry_count == 1
    assert retry.next_attempt_at == NOW + timedelta(seconds=60)  # the longer backoff


def test_retryable_failure_with_every_retry_used_fails_the_job():
    state = failed_retryably(started(), 3)
    assert state.retry_count == 3
    event = _failed(state.attempt_id, retryable=True)

    events = decide(state, event)

    assert events == [event, JobFailed(error="model timed out", retry_count=3)]
    assert apply(state, events).status is JobStatus.FAILED


def test_permanent_failure_fails_the_job_at_once_with_the_generators_error():
    state = started()
    event = _failed(state.attempt_id, retryable=False)

    events = decide(state, event)

    assert events == [event, JobFailed(error="invalid API key", retry_count=0)]


def test_failure_of_a_superseded_attempt_records_nothing():
    state = failed_retryably(started(), 1)

    assert decide(state, _failed(uuid4(), retryable=False)) == []


def test_retry_timer_queues_the_job_again_with_a_new_attempt():
    state = apply(started(), decide(started(), _failed(started().attempt_id, retryable=True)))
    due = NOW + timedelta(seconds=60)

    events = domain.retry_due(state, now=due, policy=POLICY, new_id=lambda: UUID(int=77))

    assert events[0] == JobQueued(priority=7, retry_count=1)
    dispatched = events[1]
    assert isinstance(dispatched, GenerationRequested)
    assert dispatched.attempt == 2
    assert dispatched.attempt_id == UUID(int=77)
    assert dispatched.lease_expires_at == due + timedelta(seconds=3600)
    after = apply(state, events)
    assert after.status is JobStatus.QUEUED
    assert after.next_attempt_at is None


def test_retry_timer_before_it_is_due_does_nothing():
    state = apply(started(), decide(started(), _failed(started().attempt_id, retryable=True)))

    assert domain.retry_due(state, now=NOW + timedelta(seconds=59), policy=POLICY) == []


def test_retry_timer_of_a_job_that_is_not_waiting_does_nothing():
    assert domain.retry_due(started(), now=NOW + timedelta(days=1), policy=POLICY) == []


# -- leases ---------------------------------------------------------------------------


def test_expired_lease_fails_the_attempt_as_retryable_and_schedules_a_retry():
    state = started()
    later = NOW + timedelta(seconds=181)

    events = domain.lease_expired(state, now=later, policy=POLICY)

    assert events == [
        GenerationFailed(
            attempt_id=state.attempt_id,
            error="attempt lease expired: no generator finished it in time",
            kind="lease_expired",
            retryable=True,
        ),
        JobRetryScheduled(
            retry_count=1,
            next_attempt_at=later + timedelta(seconds=60),
            error="attempt lease expired: no generator finished it in time",
        ),
    ]


def test_queued_attempt_is_not_expired_by_the_running_lease():
    # A backlog longer than the running lease must not burn retries.
    assert domain.lease_expired(requested(), now=NOW + timedelta(seconds=181), policy=POLICY) == []


def test_queued_attempt_past_its_start_deadline_is_retried_with_its_own_message():
    events = domain.lease_expired(requested(), now=NOW + timedelta(seconds=3601), policy=POLICY)

    assert [type(event) for event in events] == [GenerationFailed, JobRetryScheduled]
    failed = events[0]
    assert isinstance(failed, GenerationFailed)
    assert failed.error == "attempt not started in time: no generator took it from the queue"


def test_lease_not_yet_expired_does_nothing():
    assert domain.lease_expired(started(), now=NOW + timedelta(seconds=179), policy=POLICY) == []


def test_expired_lease_with_every_retry_used_fails_the_job():
    state = failed_retryably(started(), 3)
    assert state.lease_expires_at is not None

    events = domain.lease_expired(
        state, now=state.lease_expires_at + timedelta(seconds=1), policy=POLICY
    )

    # The last attempt was dispatched but never started: its start deadline ran out.
    assert events[1] == JobFailed(
        error="attempt not started in time: no generator took it from the queue", retry_count=3
    )


def test_late_result_of_an_expired_attempt_is_ignored_while_the_retry_waits():
    state = started()
    expired_attempt = state.attempt_id
    state = apply(
        state, domain.lease_expired(state, now=NOW + timedelta(seconds=181), policy=POLICY)
    )

    assert decide(state, _succeeded(expired_attempt)) == []
    assert domain.ignored_because(state, _succeeded(expired_attempt)) == (
        "attempt already given up (retry scheduled)"
    )


def test_late_result_of_an_expired_attempt_is_ignored_after_the_next_dispatch():
    state = started()
    expired_attempt = state.attempt_id
    state = apply(
        state, domain.lease_expired(state, now=NOW + timedelta(seconds=181), policy=POLICY)
    )
    state = apply(
        state, domain.retry_due(state, now=NOW + timedelta(hours=1), policy=POLICY, new_id=uuid4)
    )

    assert decide(state, _succeeded(expired_attempt)) == []
    assert domain.ignored_because(state, _succeeded(expired_attempt)) == (
        "result of a superseded attempt"
    )
    assert decide(state, _succeeded(state.attempt_id))  # the new attempt still counts


# -- cancellation and final states ----------------------------------------------------


@pytest.mark.parametrize("setup", ["queued", "processing", "retry_scheduled"])
def test_cancel_of_a_job_that_has_not_ended_cancels_it(setup: str):
    state = {
        "queued": requested,
        "processing": started,
        "retry_scheduled": lambda: apply(
            started(), decide(started(), _failed(started().attempt_id, retryable=True))
        ),
    }[setup]()
    event = JobCancelRequested(reason="changed my mind")

    events = decide(state, event)

    assert events == [event, JobCancelled(reason="changed my mind")]
    after = apply(state, events)
    assert after.status is JobStatus.CANCELLED
    assert after.lease_expires_at is None
    assert after.next_attempt_at is None


def test_a_request_whose_cancel_came_first_is_recorded_cancelled_with_no_attempt():
    cancel = JobCancelRequested(reason="changed my mind")

    events = decide(JobState(job_id=JOB_ID), REQUEST, cancelled_first=cancel)

    assert events == [REQUEST, cancel, JobCancelled(reason="changed my mind")]
    state = apply(JobState(job_id=JOB_ID), events)
    assert state.status is JobStatus.CANCELLED
    assert state.attempt_id is None


def test_cancel_of_an_unknown_job_records_nothing():
    assert decide(JobState(job_id=JOB_ID), JobCancelRequested()) == []


def test_result_after_cancel_records_nothing_so_no_object_reaches_the_canvas():
    state = started()
    attempt_id = state.attempt_id
    state = apply(state, decide(state, JobCancelRequested()))

    assert decide(state, _succeeded(attempt_id)) == []


def _final_states() -> dict[str, JobState]:
    completed = started()
    completed = apply(completed, decide(completed, _succeeded(completed.attempt_id)))
    failed = started()
    failed = apply(failed, decide(failed, _failed(failed.attempt_id, retryable=False)))
    cancelled = started()
    cancelled = apply(cancelled, decide(cancelled, JobCancelRequested()))
    return {"completed": completed, "failed": failed, "cancelled": cancelled}


@pytest.mark.parametrize("final", ["completed", "failed", "cancelled"])
def test_nothing_changes_a_job_in_a_final_state(final: str):
    state = _final_states()[final]
    attempt_id = state.attempt_id
    assert state.is_final
    assert attempt_id is not None
    incoming: list[Event] = [
        REQUEST,
        GenerationStarted(attempt_id=attempt_id, model="m", generator_id="g"),
        GenerationProgressed(attempt_id=attempt_id, index=5, object=OBJECTS[0]),
        _succeeded(attempt_id),
        _failed(attempt_id, retryable=True),
        _failed(attempt_id, retryable=False),
        JobCancelRequested(),
    ]

    for event in incoming:
        assert decide(state, event) == [], event
    later = NOW + timedelta(days=1)
    assert domain.retry_due(state, now=later, policy=POLICY) == []
    assert domain.lease_expired(state, now=later, policy=POLICY) == []


def test_events_only_the_orchestrator_records_are_not_commands():
    with pytest.raises(UnexpectedEvent):
        decide(requested(), JobQueued(priority=1, retry_count=0))


# -- folding and reporting ------------------------------------------------------------


def test_fold_of_a_stream_equals_evolving_it_event_by_event():
    state = requested()
    events = [
        REQUEST,
        *decide(JobState(job_id=JOB_ID), REQUEST, new_id=lambda: UUID(int=1))[1:],
    ]

    folded = domain.fold(JOB_ID, events)

    assert folded.status is JobStatus.QUEUED
    assert folded.version == len(events) == state.version


@pytest.mark.parametrize(
    ("event", "status"),
    [
        (JobQueued(priority=1, retry_count=0), JobStatus.QUEUED),
        (GenerationStarted(attempt_id=uuid4(), model="m", generator_id="g"), JobStatus.PROCESSING),
        (
            JobRetryScheduled(retry_count=1, next_attempt_at=NOW, error="x"),
            JobStatus.RETRY_SCHEDULED,
        ),
        (
            JobCompleted(object_count=0, object_ids=[], dropped_objects=0, model="m", latency_ms=0),
            JobStatus.COMPLETED,
        ),
        (JobFailed(error="x", retry_count=0), JobStatus.FAILED),
        (JobCancelled(), JobStatus.CANCELLED),
        (REQUEST, None),
        (JobCancelRequested(), None),
    ],
)
def test_status_reached_names_the_status_an_event_enters(event: Event, status: JobStatus | None):
    assert domain.status_reached(event) is status


def test_backoff_is_unit_times_base_to_the_retry_count():
    policy = Policy(backoff_base=3, backoff_unit_seconds=10)

    assert [policy.backoff(n).total_seconds() for n in range(3)] == [10, 30, 90]


def test_only_completed_failed_and_cancelled_are_final():
    assert {status for status in JobStatus if status.is_final} == {
        JobStatus.COMPLETED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
    }


# -- fair dispatch: queued, then dispatched (canvas_orchestrator.dispatch) -------------


def awaiting() -> JobState:
    """A new job queued without its attempt: it awaits the dispatcher."""
    state = JobState(job_id=JOB_ID)
    events = decide(state, REQUEST, dispatch_now=False)
    assert [type(e) for e in events] == [JobRequested, JobQueued]
    return apply(state, events)


def test_a_job_queued_without_dispatch_awaits_it_and_has_no_attempt():
    state = awaiting()
    assert state.status is JobStatus.QUEUED
    assert state.awaiting_dispatch
    assert state.attempt == 0 and state.attempt_id is None
    # No lease runs while it waits: nothing can expire.
    assert domain.lease_expired(state, now=NOW + timedelta(days=30), policy=POLICY) == []


def test_dispatch_hands_a_waiting_job_its_attempt_once():
    state = awaiting()
    events = domain.dispatch(state, now=NOW, policy=POLICY, new_id=sequential_ids())
    assert len(events) == 1
    (requested_event,) = events
    assert isinstance(requested_event, GenerationRequested)
    assert requested_event.attempt == 1
    assert requested_event.priority == REQUEST.priority
    assert requested_event.lease_expires_at == NOW + timedelta(seconds=3600)
    state = apply(state, events)
    assert not state.awaiting_dispatch and state.attempt_id == UUID(int=1)
    # Dispatched already, or never queued: nothing to hand out.
    assert domain.dispatch(state, now=NOW, policy=POLICY) == []
    assert domain.dispatch(JobState(job_id=JOB_ID), now=NOW, policy=POLICY) == []


def test_dispatch_now_keeps_todays_single_decision():
    state = JobState(job_id=JOB_ID)
    events = decide(state, REQUEST, new_id=sequential_ids(), dispatch_now=True)
    assert [type(e) for e in events] == [JobRequested, JobQueued, GenerationRequested]
    assert not apply(state, events).awaiting_dispatch


def test_a_cancel_ends_the_wait_for_dispatch():
    state = awaiting()
    events = decide(state, JobCancelRequested(reason=None))
    state = apply(state, events)
    assert state.status is JobStatus.CANCELLED and not state.awaiting_dispatch
    assert domain.dispatch(state, now=NOW, policy=POLICY) == []


def test_a_due_retry_awaits_dispatch_and_the_old_attempt_no_longer_counts():
    state = started()
    old = state.attempt_id
    assert old is not None
    state = apply(
        state,
        decide(
            state, GenerationFailed(attempt_id=old, error="slow", kind="timeout", retryable=True)
        ),
    )
    later = NOW + timedelta(hours=1)
    events = domain.retry_due(state, now=later, policy=POLICY, dispatch_now=False)
    assert [type(e) for e in events] == [JobQueued]
    state = apply(state, events)
    assert state.awaiting_dispatch and state.status is JobStatus.QUEUED
    # A late start or result of the attempt given up changes nothing while it waits.
    late = GenerationSucceeded(
        attempt_id=old, objects=OBJECTS, dropped_objects=0, model="m", usage={}, latency_ms=1
    )
    assert decide(state, _started(state)) == []
    assert decide(state, late) == []
    assert domain.ignored_because(state, late) == "result of a superseded attempt"
    events = domain.dispatch(state, now=later, policy=POLICY, new_id=lambda: UUID(int=99))
    assert [(type(e), getattr(e, "attempt", None)) for e in events] == [(GenerationRequested, 2)]
