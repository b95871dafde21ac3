from __future__ import annotations

import uuid

import orjson
import pytest

from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage, UnknownEventType
from canvas_events.events import (
    EVENT_TYPES,
    GenerationFailed,
    JobRequested,
    parse_event,
    register_upcaster,
)


def _requested() -> Envelope:
    return Envelope.wrap(
        JobRequested(query="a flowchart of a login flow", canvas_id="c1", priority=5),
        correlation_id="req-1",
        job_id=uuid.uuid4(),
        user_id="alice",
        canvas_id="c1",
    )


def test_envelope_round_trips_through_json_with_typed_data() -> None:
    envelope = _requested()
    parsed = Envelope.from_json(envelope.to_json())
    assert parsed == envelope
    event = parse_event(parsed)
    assert isinstance(event, JobRequested)
    assert event.query == "a flowchart of a login flow"


def test_follow_carries_job_user_canvas_and_correlation_and_sets_causation() -> None:
    first = _requested()
    attempt = uuid.uuid4()
    nxt = first.follow(GenerationFailed(attempt_id=attempt, error="x", kind="k", retryable=True))
    assert (nxt.job_id, nxt.user_id, nxt.canvas_id) == (first.job_id, "alice", "c1")
    assert nxt.correlation_id == first.correlation_id
    assert nxt.causation_id == first.event_id
    assert nxt.event_id != first.event_id
    assert nxt.type == "GenerationFailed"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"type": "JobRequested"}', "correlation_id"),
    ],
)
def test_bad_bodies_are_poison_with_a_reason(body: bytes, says: str) -> None:
    with pytest.raises(PoisonMessage, match=says):
        Envelope.from_json(body)


def test_unknown_type_is_poison() -> None:
    raw = orjson.loads(_requested().to_json())
    raw["type"] = "JobTeleported"
    with pytest.raises(UnknownEventType, match="JobTeleported"):
        parse_event(Envelope.from_json(orjson.dumps(raw)))


def test_future_schema_version_is_poison() -> None:
    raw = orjson.loads(_requested().to_json())
    raw["schema_version"] = 99
    with pytest.raises(PoisonMessage, match="newer"):
        parse_event(Envelope.from_json(orjson.dumps(raw)))


def test_missing_field_in_data_is_poison_naming_the_field() -> None:
    raw = orjson.loads(_requested().to_json())
    del raw["data"]["query"]
    with pytest.raises(PoisonMessage, match="query"):
        parse_event(Envelope.from_json(orjson.dumps(raw)))


def test_events_are_frozen() -> None:
    event = JobRequested(query="q", canvas_id="c", priority=1)
    with pytest.raises(ValueError, match="frozen"):
        event.query = "other"  # type: ignore[misc]


def test_upcaster_turns_an_old_schema_into_the_current_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pretend JobRequested moved to v2, which renamed "prompt" to "query".
    monkeypatch.setattr(JobRequested, "SCHEMA_VERSION", 2)
    register_upcaster("JobRequested", 1)(
        lambda data: {**{k: v for k, v in data.items() if k != "prompt"}, "query": data["prompt"]}
    )
    old = Envelope(
        type="JobRequested",
        schema_version=1,
        correlation_id="c",
        data={"prompt": "old shape", "canvas_id": "c", "priority": 3},
    )
    event = parse_event(old)
    assert isinstance(event, JobRequested)
    assert event.query == "old shape"


def test_every_domain_event_of_the_contract_is_registered() -> None:
    assert set(EVENT_TYPES) == {
        "JobRequested",
        "JobQueued",
        "GenerationRequested",
        "GenerationStarted",
        "GenerationProgressed",
        "GenerationSucceeded",
        "GenerationFailed",
        "JobRetryScheduled",
        "JobCompleted",
        "JobFailed",
        "JobCancelRequested",
        "JobCancelled",
    }
