"""A job folded from frames, and the one-line descriptions of a plain watch."""

from __future__ import annotations

from typing import Any

import pytest

from canvas_cli.view import (
    JobView,
    canvas_of,
    describe_frame,
    describe_object,
    frame_from_event,
    is_final,
    summary,
)

JOB = "3f1c9a52-8d7e-4b1a-9c33-2f5d6e7a8b90"
ATTEMPT_1 = "00000000-0000-0000-0000-000000000001"
ATTEMPT_2 = "00000000-0000-0000-0000-000000000002"


def frame(kind: str, position: int, job_id: str = JOB, **data: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "job_id": job_id,
        "canvas_id": "board",
        "position": position,
        "occurred_at": "2025-01-01T12:00:00Z",
        "data": data,
    }


def test_recorded_events_become_the_frames_the_notifier_sends() -> None:
    events = [
        {"type": "JobRequested", "position": 1, "data": {"canvas_id": "board", "query": "q"}},
        {"type": "JobQueued", "position": 2, "data": {"priority": 5, "retry_count": 0}},
        {"type": "GenerationRequested", "position": 3, "data": {"attempt_id": ATTEMPT_1}},
        {
            "type": "GenerationStarted",
            "position": 4,
            "data": {"attempt_id": ATTEMPT_1, "model": "m", "generator_id": "g"},
        },
        {
            "type": "GenerationProgressed",
            "position": 5,
            "data": {"attempt_id": ATTEMPT_1, "index": 0, "object": {"type": "circle"}},
        },
        {
            "type": "JobRetryScheduled",
            "position": 6,
            "data": {"retry_count": 1, "next_attempt_at": "2025-01-01T12:01:00Z", "error": "e"},
        },
        {"type": "JobFailed", "position": 7, "data": {"error": "bad key", "retry_count": 3}},
        {"type": "JobCancelled", "position": 8, "data": {"reason": "user"}},
        {
            "type": "JobCompleted",
            "position": 9,
            "occurred_at": "2025-01-01T12:00:09Z",
            "data": {"object_count": 2, "object_ids": ["a", "b"], "dropped_objects": 0},
        },
    ]
    assert canvas_of(events) == "board"
    frames = [frame_from_event(JOB, "board", event) for event in events]
    assert [f["type"] if f else None for f in frames] == [
        None,
        "ai_job_queued",
        None,
        "ai_generation_started",
        "ai_generation_progress",
        "ai_job_error",
        "ai_job_error",
        "ai_job_cancelled",
        "ai_generation_completed",
    ]
    started, progress, retry, failed = frames[3], frames[4], frames[5], frames[6]
    assert started is not None and started["data"] == {"model": "m", "attempt_id": ATTEMPT_1}
    assert progress is not None and progress["data"]["object"] == {"type": "circle"}
    assert retry is not None and retry["data"]["retryable"] and not retry["data"]["final"]
    assert failed is not None and failed["data"]["final"] and failed["data"]["error"] == "bad key"
    completed = frames[8]
    assert completed is not None
    assert completed["position"] == 9
    assert completed["occurred_at"] == "2025-01-01T12:00:09Z"
    assert completed["job_id"] == JOB
    assert completed["data"]["object_count"] == 2


def test_objects_stream_in_and_completion_ends_the_job() -> None:
    view = JobView(JOB)
    assert view.apply(frame("ai_job_queued", 1, priority=7, retry_count=0))
    assert view.status == "queued" and view.priority == 7
    assert view.apply(frame("ai_generation_started", 2, model="m", attempt_id=ATTEMPT_1))
    assert view.apply(
        frame("ai_generation_progress", 3, index=0, object={"type": "text"}, attempt_id=ATTEMPT_1)
    )
    assert view.apply(
        frame("ai_generation_progress", 4, index=1, object={"type": "line"}, attempt_id=ATTEMPT_1)
    )
    assert view.status == "processing"
    assert view.objects == {0: {"type": "text"}, 1: {"type": "line"}}
    assert view.object_count == 2
    assert view.outcome is None

    assert view.apply(frame("ai_generation_completed", 5, object_count=2, model="m"))
    assert view.outcome == "completed"
    assert view.canvas_id == "board"
    assert summary(view).startswith("completed: 2 objects")
    # Nothing moves a finished job.
    assert not view.apply(frame("ai_job_cancelled", 6))
    assert view.outcome == "completed"


def test_a_frame_is_applied_once_and_only_for_its_job() -> None:
    view = JobView(JOB)
    assert view.apply(frame("ai_job_queued", 10, priority=5))
    assert not view.apply(frame("ai_job_queued", 10, priority=5))  # redelivered
    assert not view.apply(frame("ai_job_queued", 9, priority=5))  # older than what was seen
    assert not view.apply(frame("ai_generation_started", 11, job_id="another-job"))
    assert not view.apply({"type": "subscribed", "job_id": JOB})
    assert view.last_position == 10


def test_a_failed_attempt_drops_its_objects_and_the_next_attempt_starts_afresh() -> None:
    view = JobView(JOB)
    view.apply(frame("ai_generation_started", 1, model="m", attempt_id=ATTEMPT_1))
    view.apply(frame("ai_generation_progress", 2, index=0, object={"type": "circle"}))
    view.apply(
        frame(
            "ai_job_error",
            3,
            retryable=True,
            final=False,
            error="timeout",
            retry_count=1,
            next_attempt_at="2025-01-01T12:01:00Z",
        )
    )
    assert view.status == "retry_scheduled"
    assert view.objects == {}
    assert view.retry_count == 1
    assert view.next_attempt_at == "2025-01-01T12:01:00Z"
    assert view.outcome is None

    view.apply(frame("ai_job_queued", 4, priority=5, retry_count=1))
    view.apply(frame("ai_generation_started", 5, model="m", attempt_id=ATTEMPT_2))
    # A late object of the superseded attempt never reaches the canvas.
    view.apply(
        frame("ai_generation_progress", 6, index=3, object={"type": "text"}, attempt_id=ATTEMPT_1)
    )
    assert view.objects == {}
    assert view.attempts == 2

    view.apply(frame("ai_job_error", 7, retryable=False, final=True, error="bad key"))
    assert view.outcome == "failed"
    assert view.error == "bad key"
    assert [f.final for f in view.failures] == [False, True]
    assert summary(view) == "failed: bad key"


def test_cancellation_drops_the_partial_drawing() -> None:
    view = JobView(JOB)
    view.apply(frame("ai_generation_progress", 1, index=0, object={"type": "circle"}))
    view.apply(frame("ai_job_cancelled", 2, reason="cancelled by the user"))
    assert view.outcome == "cancelled"
    assert view.objects == {}
    assert summary(view) == "cancelled: cancelled by the user"


@pytest.mark.parametrize(
    ("kind", "data", "final"),
    [
        ("ai_generation_completed", {}, True),
        ("ai_job_cancelled", {}, True),
        ("ai_job_error", {"final": True}, True),
        ("ai_job_error", {"final": False}, False),
        ("ai_generation_progress", {}, False),
    ],
)
def test_only_completion_cancellation_and_a_final_error_end_a_job(
    kind: str, data: dict[str, Any], final: bool
) -> None:
    assert is_final(frame(kind, 1, **data)) is final


@pytest.mark.parametrize(
    ("obj", "text"),
    [
        (
            {"type": "rectangle", "x": 100, "y": 80.0, "width": 200, "height": 60, "text": "Login"},
            'rectangle at (100, 80) 200x60 "Login"',
        ),
        ({"type": "circle", "x": 5, "y": 6, "radius": 7}, "circle at (5, 6) r=7"),
        ({"type": "arrow", "points": [[0, 0], [5, 5], [10, 20]]}, "arrow (0, 0) → (10, 20)"),
        ({"type": "text", "x": 1, "y": 2, "text": "x" * 50}, f'text at (1, 2) "{"x" * 39}…"'),
        ({}, "object"),
    ],
)
def test_an_object_is_described_in_a_few_words(obj: dict[str, Any], text: str) -> None:
    assert describe_object(obj) == text


def test_each_frame_reads_as_one_line() -> None:
    assert describe_frame(frame("ai_job_queued", 1, priority=5, retry_count=0)) == (
        "queued (priority 5)"
    )
    assert describe_frame(frame("ai_job_queued", 1, priority=5, retry_count=2)) == (
        "queued (priority 5, retry 2)"
    )
    assert describe_frame(frame("ai_generation_started", 1, model="gpt")) == "started: model gpt"
    assert describe_frame(
        frame("ai_generation_progress", 1, index=4, object={"type": "circle", "radius": 3})
    ) == ("object 4: circle r=3")
    assert describe_frame(
        frame(
            "ai_generation_completed",
            1,
            object_count=5,
            dropped_objects=1,
            model="gpt",
            latency_ms=1234,
        )
    ) == ("completed: 5 objects (1 invalid dropped), model gpt, 1.2 s")
    assert describe_frame(frame("ai_generation_completed", 1, object_count=1)) == (
        "completed: 1 object"
    )
    assert describe_frame(frame("ai_job_error", 1, final=True, error="no key")) == (
        "failed: no key"
    )
    retry = describe_frame(
        frame(
            "ai_job_error",
            1,
            final=False,
            error="429",
            retry_count=1,
            next_attempt_at="2025-01-01T12:01:00+00:00",
        )
    )
    assert retry.startswith("error: 429; retry 1 at ")
    assert describe_frame(frame("ai_job_cancelled", 1, reason=None)) == "cancelled"
