"""One attempt without a broker: the model client replaced by a stub."""

from __future__ import annotations

import json
from typing import Any

from canvas_events.broker import Broker
from canvas_events.events import GenerationFailed, GenerationRequested, GenerationSucceeded
from canvas_events.topology import Topology
from canvas_generator.client import Completion
from canvas_generator.worker import Worker
from tests.generator.conftest import generation_request


class StubClient:
    model = "stub-model"

    def __init__(self, reply: Completion | BaseException) -> None:
        self.reply = reply
        self.calls: list[Any] = []

    async def complete(self, messages: Any) -> Completion:
        self.calls.append(messages)
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply


def _worker(client: StubClient) -> Worker:
    broker = Broker("amqp://unused/", Topology("unused"), connection_name="test")
    return Worker(broker, client, generator_id="test-generator", prefetch=1)  # type: ignore[arg-type]


def _completion(text: str, finish_reason: str = "stop") -> Completion:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    return Completion(text, "stub-model-2025", usage, 12, finish_reason)


def _request() -> GenerationRequested:
    return GenerationRequested.model_validate(generation_request("a flow").data)


async def test_success_carries_model_usage_and_latency_from_the_reply():
    box = {"type": "rectangle", "x": 1, "y": 1, "width": 2, "height": 2}
    result = await _worker(StubClient(_completion(json.dumps({"objects": [box, {}]})))).attempt(
        _request()
    )
    assert isinstance(result, GenerationSucceeded)
    assert (result.model, result.latency_ms, result.dropped_objects) == ("stub-model-2025", 12, 1)
    assert result.usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


async def test_reply_cut_at_its_length_limit_says_so():
    result = await _worker(StubClient(_completion('{"objects": [{"type"', "length"))).attempt(
        _request()
    )
    assert isinstance(result, GenerationFailed)
    assert (result.kind, result.retryable) == ("bad_output", True)
    assert "cut off" in result.error


async def test_unexpected_error_is_reported_as_a_retryable_internal_failure():
    result = await _worker(StubClient(KeyError("choices"))).attempt(_request())
    assert isinstance(result, GenerationFailed)
    assert (result.kind, result.retryable) == ("internal", True)


async def test_empty_query_fails_permanently_without_a_model_call():
    client = StubClient(_completion("{}"))
    request = _request().model_copy(update={"query": "\x00\x01"})
    result = await _worker(client).attempt(request)
    assert isinstance(result, GenerationFailed)
    assert (result.kind, result.retryable) == ("bad_request", False)
    assert client.calls == []
