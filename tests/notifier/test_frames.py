"""The notifier's protocol without I/O: events to frames, subscriptions, client messages."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson
import pytest

from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage
from canvas_events.events import JobCancelRequested, JobRequested
from canvas_notifier.frames import (
    STATUS_TYPES,
    Frame,
    Invalid,
    Subscribe,
    Subscription,
    Target,
    Unsubscribe,
    parse_client_message,
    to_frame,
)
from tests.notifier import support
from tests.notifier.support import recorded

JOB = UUID("11111111-1111-4111-8111-111111111111")


def frame_of(event, **kwargs) -> dict[str, Any]:
    frame = to_frame(recorded(event, position=7, user_id="alice", job_id=JOB, **kwargs))
    assert frame is not None
    body: dict[str, Any] = orjson.loads(frame.data)
    return body


def test_job_queued_becomes_ai_job_queued_with_every_envelope_field():
    assert frame_of(support.queued(priority=8, retry_count=2)) == {
        "type": "ai_job_queued",
        "job_id": str(JOB),
        "canvas_id": "canvas-1",
        "position": 7,
        "occurred_at": "2025-01-02T03:04:05.678901Z",
        "data": {"priority": 8, "retry_count": 2},
    }


def test_generation_progressed_carries_index_and_object():
    frame = frame_of(support.progressed(index=3, text="box"))
    assert frame["type"] == "ai_generation_progress"
    assert frame["data"]["index"] == 3
    assert frame["data"]["object"] == {"type": "text", "x": 1, "y": 2, "text": "box"}


@pytest.mark.parametrize(
    ("event", "frame_type", "data"),
    [
        pytest.param(
            support.started(),
            "ai_generation_started",
            {"model": "stand-in", "attempt_id": str(support.ATTEMPT)},
            id="started-carries-model-and-attempt",
        ),
        pytest.param(
            support.completed(),
            "ai_generation_completed",
            {
                "object_count": 1,
                "object_ids": ["o-1"],
                "dropped_objects": 1,
                "model": "stand-in",
                "usage": {"prompt_tokens": 10, "completion_tokens": 20},
                "latency_ms": 12,
            },
            id="completed-carries-the-result",
        ),
        pytest.param(
            support.retry_scheduled(),
            "ai_job_error",
            {
                "retryable": True,
                "final": False,
                "next_attempt_at": "2025-01-02T03:06:05.678901Z",
                "error": "model timed out",
                "retry_count": 1,
            },
            id="retry-scheduled-is-a-retryable-not-final-error",
        ),
        pytest.param(
            support.failed(),
            "ai_job_error",
            {
                "retryable": False,
                "final": True,
                "next_attempt_at": None,
                "error": "invalid API key",
                "retry_count": 0,
            },
            id="failed-is-a-final-not-retryable-error",
        ),
        pytest.param(
            support.cancelled(), "ai_job_cancelled", {"reason": "user asked"}, id="cancelled"
        ),
    ],
)
def test_a_status_event_becomes_its_frame_with_its_data(event, frame_type, data):
    frame = frame_of(event)
    assert frame["type"] == frame_type
    assert frame["data"] == data


@pytest.mark.parametrize(
    "event",
    [
        support.requested(),
        support.succeeded(),
        JobRequested(query="q", canvas_id="c", priority=5),
        JobCancelRequested(),
    ],
    ids=lambda event: type(event).__name__,
)
def test_events_clients_do_not_see_have_no_frame(event):
    assert to_frame(recorded(event, position=1, user_id="alice")) is None


def test_an_event_without_a_position_has_no_frame():
    envelope = recorded(support.queued(), position=1, user_id="alice")
    assert to_frame(envelope.model_copy(update={"position": None})) is None


def test_a_status_event_whose_data_breaks_its_schema_is_poison():
    envelope = recorded(support.queued(), position=1, user_id="alice")
    with pytest.raises(PoisonMessage):
        to_frame(envelope.model_copy(update={"data": {"priority": "high"}}))


def test_a_replayed_event_renders_exactly_like_its_live_copy():
    live = recorded(support.retry_scheduled(), position=4, user_id="alice")
    # What the broker carries is JSON; what the store gives back is rebuilt from columns.
    from_wire = Envelope.from_json(live.to_json())
    from_store = Envelope(**live.model_dump())
    assert to_frame(from_wire) == to_frame(from_store)


def test_status_types_are_the_seven_the_contract_names():
    assert set(STATUS_TYPES) == {
        "JobQueued",
        "GenerationStarted",
        "GenerationProgressed",
        "JobCompleted",
        "JobRetryScheduled",
        "JobFailed",
        "JobCancelled",
    }


# -- subscriptions -----------------------------------------------------------------------


def frame(job_id: str = "j1", canvas_id: str | None = "c1") -> Frame:
    return Frame(position=1, type="ai_job_queued", job_id=job_id, canvas_id=canvas_id, data=b"{}")


def test_an_empty_subscription_matches_everything():
    assert Subscription().matches(frame())


def test_a_job_subscription_matches_only_that_job():
    subscription = Subscription().add(Target("job_id", "j1"))
    assert subscription.matches(frame(job_id="j1"))
    assert not subscription.matches(frame(job_id="j2"))


def test_subscriptions_add_up_to_a_union_of_jobs_and_canvases():
    subscription = Subscription().add(Target("job_id", "j1")).add(Target("canvas_id", "c2"))
    assert subscription.matches(frame(job_id="j1", canvas_id="c9"))
    assert subscription.matches(frame(job_id="j7", canvas_id="c2"))
    assert not subscription.matches(frame(job_id="j7", canvas_id="c9"))
    assert not subscription.matches(frame(job_id="j7", canvas_id=None))


def test_unsubscribing_one_keeps_the_others_and_a_bare_unsubscribe_widens_to_all():
    subscription = Subscription().add(Target("job_id", "j1")).add(Target("job_id", "j2"))
    narrower = subscription.remove(Target("job_id", "j1"))
    assert not narrower.matches(frame(job_id="j1"))
    assert narrower.matches(frame(job_id="j2"))
    assert subscription.remove(None) == Subscription()


# -- client messages ---------------------------------------------------------------------


def test_subscribe_to_a_job_is_parsed_with_a_canonical_uuid():
    message = parse_client_message(orjson.dumps({"type": "subscribe", "job_id": str(JOB).upper()}))
    assert message == Subscribe(Target("job_id", str(JOB)))


def test_subscribe_to_a_canvas_is_parsed():
    message = parse_client_message('{"type": "subscribe", "canvas_id": "c-1"}')
    assert message == Subscribe(Target("canvas_id", "c-1"))


def test_unsubscribe_with_or_without_a_target_is_parsed():
    assert parse_client_message('{"type": "unsubscribe"}') == Unsubscribe(None)
    assert parse_client_message('{"type": "unsubscribe", "canvas_id": "c"}') == Unsubscribe(
        Target("canvas_id", "c")
    )


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        '{"type": "dance"}',
        '{"job_id": "x"}',
        '{"type": "subscribe"}',
        '{"type": "subscribe", "job_id": "not-a-uuid"}',
        '{"type": "subscribe", "job_id": 5}',
        '{"type": "subscribe", "canvas_id": ""}',
        '{"type": "subscribe", "job_id": "11111111-1111-4111-8111-111111111111", "canvas_id": "c"}',
        '{"type": "subscribe", "canvas_id": "c", "extra": 1}',
        b"\xff\xfe",
    ],
)
def test_anything_unexpected_is_invalid_with_a_reason(raw):
    message = parse_client_message(raw)
    assert isinstance(message, Invalid)
    assert message.detail
