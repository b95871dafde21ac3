"""One attempt without a broker: the model client replaced by a stub."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from canvas_events.broker import Broker
from canvas_events.events import GenerationFailed, GenerationRequested, GenerationSucceeded
from canvas_events.topology import Topology
from canvas_generator.client import Completion
from canvas_generator.worker import Worker
from tests.generator.conftest import cancel_message, generation_request


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


class BlockingClient:
    """A model call that lasts until cancelled."""

    model = "stub-model"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.aborted = False

    async def complete(self, messages: Any) -> Completion:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.aborted = True
            raise
        raise AssertionError("unreachable")


async def test_job_cancel_aborts_the_model_call_and_yields_no_result():
    client = BlockingClient()
    worker = _worker(client)  # type: ignore[arg-type]
    envelope = generation_request("a flow")
    request = GenerationRequested.model_validate(envelope.data)
    assert envelope.job_id is not None
    running = asyncio.create_task(worker._attempt_unless_cancelled(envelope.job_id, request))
    await client.entered.wait()
    await worker.cancellations.handle(cancel_message(envelope), None)  # type: ignore[arg-type]
    assert await running is None
    assert client.aborted


async def test_cancelling_the_handler_itself_is_not_taken_for_a_job_cancel():
    # At shutdown the broker cancels its handlers: that must stay a cancellation (the
    # message is not acked, another generator gets it), not become "job cancelled".
    client = BlockingClient()
    envelope = generation_request("a flow")
    request = GenerationRequested.model_validate(envelope.data)
    assert envelope.job_id is not None
    running = asyncio.create_task(
        _worker(client)._attempt_unless_cancelled(envelope.job_id, request)  # type: ignore[arg-type]
    )
    await client.entered.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert client.aborted
