from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from unittest import mock
from zoneinfo import ZoneInfo

import orjson
import pytest
from asyncpg.pgproto import pgproto

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


def _the_long_way(envelope: Envelope) -> bytes:
    """What to_json wrote before its fast path: pydantic's JSON mode, then orjson."""
    return orjson.dumps(envelope.model_dump(mode="json"))


@pytest.mark.parametrize(
    "occurred_at",
    [
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 1, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(0))),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=ZoneInfo("UTC")),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=ZoneInfo("Europe/London")),
        datetime(2026, 7, 2, 3, 4, 5, 999999, tzinfo=ZoneInfo("Europe/Paris")),
        datetime(2026, 1, 2, 3, 4, 5),
    ],
)
def test_to_json_writes_the_same_bytes_as_pydantic_json_mode(occurred_at: datetime) -> None:
    envelope = Envelope(
        type="ObjectDrawn",
        schema_version=1,
        occurred_at=occurred_at,
        correlation_id="req-1",
        causation_id=uuid.uuid4(),
        job_id=uuid.uuid4(),
        user_id="user-é",
        canvas_id=None,
        position=2**40,
        data={"object": {"kind": "circle", "x": 1.5, "y": -2, "nan": float("nan")}, "l": [1, None]},
    )
    assert envelope.to_json() == _the_long_way(envelope)
    recorded = envelope.model_copy(update={"position": 7, "job_id": uuid.uuid4()})
    assert recorded.to_json() == _the_long_way(recorded)


def test_to_json_writes_data_only_pydantic_can_write_the_long_way() -> None:
    envelope = Envelope(
        type="ObjectDrawn",
        schema_version=1,
        correlation_id="req-1",
        data={"ids": {uuid.UUID(int=1)}, "by_number": {1: "one"}},
    )
    assert envelope.to_json() == _the_long_way(envelope)
    assert orjson.loads(envelope.to_json())["data"]["by_number"] == {"1": "one"}


def test_to_json_of_an_envelope_read_from_the_store_takes_the_fast_path() -> None:
    # asyncpg returns UUIDs of its own class, and pydantic keeps them as they are.
    stored = pgproto.UUID(str(uuid.uuid4()))
    envelope = Envelope(
        event_id=stored,
        type="ObjectDrawn",
        schema_version=1,
        correlation_id="req-1",
        causation_id=pgproto.UUID(str(uuid.uuid4())),
        job_id=stored,
        data={"job_id": str(stored)},
    )
    assert type(envelope.event_id) is pgproto.UUID
    expected = _the_long_way(envelope)
    with mock.patch.object(Envelope, "model_dump", side_effect=AssertionError("long way")):
        assert envelope.to_json() == expected
