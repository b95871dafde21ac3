"""One attempt without a broker: the model client replaced by a stub, and for streamed
replies the progress events' publish function too."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from canvas_events.broker import Broker
from canvas_events.envelope import Envelope
from canvas_events.errors import PublishError
from canvas_events.events import (
    GenerationFailed,
    GenerationProgressed,
    GenerationRequested,
    GenerationSucceeded,
)
from canvas_events.topology import Topology
from canvas_generator.client import Completion
from canvas_generator.progress import Progress
from canvas_generator.worker import Worker
from tests.generator.conftest import cancel_message, generation_request


class StubClient:
    model = "stub-model"
    stream = False

    def __init__(self, reply: Completion | BaseException) -> None:
        self.reply = reply
        self.calls: list[Any] = []

    async def complete(self, messages: Any, *, on_text: Any = None) -> Completion:
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
    stream = False

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.aborted = False

    async def complete(self, messages: Any, *, on_text: Any = None) -> Completion:
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


# -- streamed replies ------------------------------------------------------------------

BOX = {"type": "rectangle", "x": 10.0, "y": 20.0, "width": 100.0, "height": 50.0}
CIRCLE = {"type": "circle", "x": 5.0, "y": 5.0, "radius": 3.0}
ARROW = {"type": "arrow", "points": [[0.0, 0.0], [10.0, 10.0]]}
BAD = {"type": "hexagon", "x": 1, "y": 1}


class StreamingStub:
    """A streamed model call: hands ``text`` to ``on_text`` in small pieces, letting
    other tasks run between them as a real stream does, and answers ``final`` (the
    same text unless told otherwise)."""

    model = "stub-model"
    stream = True

    def __init__(self, text: str, *, final: str | None = None, piece: int = 3) -> None:
        self.text = text
        self.final = text if final is None else final
        self.piece = piece
        self.fed = 0

    async def complete(self, messages: Any, *, on_text: Any = None) -> Completion:
        for start in range(0, len(self.text), self.piece):
            await asyncio.sleep(0)
            if on_text is not None:
                on_text(self.text[start : start + self.piece])
            self.fed = start + self.piece
        return _completion(self.final)


class Published:
    """A publish function that records what it was given; ``hold`` keeps every publish
    waiting until it is set, as a slow broker confirm would."""

    def __init__(self, *, fail: BaseException | None = None) -> None:
        self.envelopes: list[Envelope] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.fail = fail

    async def __call__(self, envelope: Envelope) -> None:
        await self.hold.wait()
        if self.fail is not None:
            raise self.fail
        self.envelopes.append(envelope)


def _streaming(client: StreamingStub, publish: Published) -> tuple[Worker, Progress, Envelope]:
    envelope = generation_request("a flow")
    request = GenerationRequested.model_validate(envelope.data)
    worker = _worker(client)  # type: ignore[arg-type]
    progress = Progress(publish, envelope, request.attempt_id, metrics=worker.metrics)
    return worker, progress, envelope


async def test_streamed_objects_are_progressed_in_order_and_make_up_the_result():
    text = json.dumps({"objects": [BOX, BAD, CIRCLE, ARROW]})
    publish = Published()
    worker, progress, envelope = _streaming(StreamingStub(text), publish)
    result = await worker.attempt(GenerationRequested.model_validate(envelope.data), progress)
    await progress.drain()
    assert isinstance(result, GenerationSucceeded)
    assert (result.objects, result.dropped_objects) == ([BOX, CIRCLE, ARROW], 1)
    events = [GenerationProgressed.model_validate(e.data) for e in publish.envelopes]
    # Indexes count valid objects only: they are the positions in the final set.
    assert [(e.index, e.object) for e in events] == list(enumerate(result.objects))
    assert {e.attempt_id for e in events} == {result.attempt_id}
    assert all(e.causation_id == envelope.event_id for e in publish.envelopes)


async def test_a_slow_confirm_does_not_hold_up_reading_the_stream():
    text = json.dumps({"objects": [BOX, CIRCLE, ARROW, BOX]})
    publish = Published()
    publish.hold.clear()  # no confirm comes until the reply has been read to its end
    client = StreamingStub(text)
    worker, progress, envelope = _streaming(client, publish)
    result = await worker.attempt(GenerationRequested.model_validate(envelope.data), progress)
    assert isinstance(result, GenerationSucceeded)
    assert client.fed >= len(text)
    assert publish.envelopes == []
    publish.hold.set()
    await progress.drain()
    indexes = [e.data["index"] for e in publish.envelopes]
    assert indexes == [0, 1, 2, 3]


async def test_reply_that_reads_otherwise_than_its_stream_fails_retryable():
    streamed = json.dumps({"objects": [BOX, CIRCLE]})
    final = json.dumps({"objects": [CIRCLE, BOX]})
    worker, progress, envelope = _streaming(StreamingStub(streamed, final=final), Published())
    result = await worker.attempt(GenerationRequested.model_validate(envelope.data), progress)
    assert isinstance(result, GenerationFailed)
    assert (result.kind, result.retryable) == ("bad_output", True)
    assert "streamed" in result.error
    await progress.aclose()


async def test_progress_that_cannot_be_published_stops_the_attempt_unreported():
    # The broker is away: the attempt must not end in a GenerationFailed of its own
    # (which could not be published either) but raise, so that the work is handed out
    # again.
    text = json.dumps({"objects": [BOX, CIRCLE, ARROW, BOX, CIRCLE, ARROW]})
    client = StreamingStub(text, piece=2)
    worker, progress, envelope = _streaming(client, Published(fail=PublishError("away")))
    with pytest.raises(PublishError):
        await worker.attempt(GenerationRequested.model_validate(envelope.data), progress)
    assert client.fed < len(text)  # it stopped reading
    await progress.aclose()
