"""Streamed replies on the real RabbitMQ, from the stand-in model (a real process) with
the real openai client: each object is published as a GenerationProgressed as soon as
the model has written it, before the attempt's result."""

from __future__ import annotations

import asyncio
import uuid

from canvas_events.envelope import Envelope
from canvas_events.errors import PublishError
from canvas_events.events import GenerationFailed, GenerationProgressed, GenerationSucceeded
from canvas_events.objects import validate_object
from tests.generator.conftest import (
    Bus,
    RunOne,
    cancel_message,
    generation_request,
    generator_settings,
    messages_until_a_later_attempt_ends,
    milestones,
    running_generator,
    wait_aborted,
)
from tests.support.fake_openai import FakeOpenAI
from tests.support.waiting import eventually


async def next_of(bus: Bus, request: Envelope, message_type: str) -> Envelope:
    """The next ``message_type`` message of ``request``'s job; what comes before it is
    put back in ``bus.seen`` order-preserving for later reads."""
    skipped: list[Envelope] = []
    try:
        while True:
            envelope = await bus.next()
            if envelope.job_id == request.job_id and envelope.type == message_type:
                return envelope
            skipped.append(envelope)
    finally:
        rest = [*skipped]
        while not bus.seen.empty():
            rest.append(bus.seen.get_nowait())
        for envelope in rest:
            bus.seen.put_nowait(envelope)


def progressed(messages: list[Envelope]) -> list[GenerationProgressed]:
    return [
        GenerationProgressed.model_validate(m.data)
        for m in messages
        if m.type == "GenerationProgressed"
    ]


async def _failed_midway(run_one: RunOne, how: str) -> GenerationFailed:
    """The result of a 12-object reply that breaks off midway (``how``: the stand-in's
    marker), once it is clear that some objects were shown first and no drawing came."""
    _, messages = await run_one(f"a long flow [[fake:objects=12,{how}]]")
    assert milestones(messages) == ["GenerationStarted", "GenerationFailed"]
    # Some objects were shown before the break; they do not make a drawing.
    assert len(progressed(messages)) >= 1
    return GenerationFailed.model_validate(messages[-1].data)


async def test_each_object_is_progressed_in_order_before_the_result(run_one):
    request, messages = await run_one("a flowchart of an order [[fake:objects=9]]")
    assert messages[0].type == "GenerationStarted"
    assert messages[-1].type == "GenerationSucceeded"
    assert {m.type for m in messages[1:-1]} == {"GenerationProgressed"}
    result = GenerationSucceeded.model_validate(messages[-1].data)
    events = progressed(messages)
    assert [e.index for e in events] == list(range(9))
    # The result carries exactly the objects shown, in the order shown.
    assert [e.object for e in events] == result.objects
    assert all(validate_object(e.object) == e.object for e in events)
    assert {e.attempt_id for e in events} == {result.attempt_id}
    for message in messages:
        assert message.causation_id == request.event_id
        assert (message.job_id, message.correlation_id) == (request.job_id, request.correlation_id)


async def test_objects_arrive_while_the_model_is_still_writing(start_generator, fake_openai, bus):
    # The stand-in pauses halfway through its reply until the gate opens: a progress
    # event that arrives meanwhile was published before the model finished, whatever
    # the machine's speed.
    gate = uuid.uuid4().hex
    async with start_generator():
        in_flight = fake_openai.stats()["in_flight"]
        request = generation_request(f"a long pipeline [[fake:objects=12,gate={gate}]]")
        await bus.publish(request)
        first = await next_of(bus, request, "GenerationProgressed")
        assert first.data["index"] == 0
        assert fake_openai.stats()["in_flight"] == in_flight + 1  # still writing
        fake_openai.open_gate(gate)
        messages = (await bus.results(request))[str(request.job_id)]
    result = GenerationSucceeded.model_validate(messages[-1].data)
    events = [GenerationProgressed.model_validate(first.data), *progressed(messages)]
    assert [e.index for e in events] == list(range(12))
    assert [e.object for e in events] == result.objects


async def test_invalid_objects_in_the_stream_are_dropped_and_not_progressed(run_one):
    _, messages = await run_one("a pipeline [[fake:objects=5,invalid=3,fence]]")
    result = GenerationSucceeded.model_validate(messages[-1].data)
    assert (len(result.objects), result.dropped_objects) == (5, 3)
    events = progressed(messages)
    assert [e.index for e in events] == [0, 1, 2, 3, 4]
    assert [e.object for e in events] == result.objects


async def test_stream_cut_off_midway_fails_retryable_after_its_objects(run_one):
    failed = await _failed_midway(run_one, "cut")
    assert (failed.kind, failed.retryable) == ("bad_output", True)
    assert "cut off" in failed.error


async def test_error_event_midway_fails_retryable_with_the_server_message(run_one):
    failed = await _failed_midway(run_one, "error_event")
    assert (failed.kind, failed.retryable) == ("server_error", True)
    assert failed.error == (
        "OpenAI reported an error midway through its reply: "
        "The server had an error while processing your request (fake)."
    )


async def test_connection_lost_midway_fails_retryable_as_a_connection_failure(
    amqp_url, topology, bus
):
    # A stand-in of its own, killed (kill -9) while its reply is paused halfway.
    gate = uuid.uuid4().hex
    with FakeOpenAI() as fake:
        settings = generator_settings(amqp_url, topology, fake)
        async with running_generator(settings):
            request = generation_request(f"a flow [[fake:objects=12,gate={gate}]]")
            await bus.publish(request)
            await next_of(bus, request, "GenerationProgressed")
            fake.process.kill()
            messages = (await bus.results(request))[str(request.job_id)]
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert (failed.kind, failed.retryable) == ("connection", True)
    assert "midway" in failed.error
    assert "GenerationSucceeded" not in milestones(messages)


async def test_cancel_midway_aborts_the_stream_and_publishes_nothing_more(
    start_generator, fake_openai, bus
):
    gate = uuid.uuid4().hex
    async with start_generator() as generator:
        before = fake_openai.stats()
        request = generation_request(f"a drawing cut short [[fake:objects=12,gate={gate}]]")
        await bus.publish(request)
        await next_of(bus, request, "GenerationProgressed")
        await bus.publish(cancel_message(request), "job.JobCancelled")
        # The stand-in saw its client hang up in the middle of the stream.
        await wait_aborted(generator, fake_openai, before)
        seen = await messages_until_a_later_attempt_ends(bus)
    fake_openai.open_gate(gate)  # nobody waits there any more
    # What it streamed before the cancel may be there; a result may not.
    assert set(seen.get(str(request.job_id), [])) <= {"GenerationStarted", "GenerationProgressed"}


async def test_without_streaming_the_reply_comes_whole_and_nothing_is_progressed(
    run_one, fake_openai
):
    fake_openai.reset()
    _, messages = await run_one("a flowchart [[fake:objects=4]]", openai_stream=False)
    assert [m.type for m in messages] == ["GenerationStarted", "GenerationSucceeded"]
    assert len(GenerationSucceeded.model_validate(messages[-1].data).objects) == 4
    (sent,) = fake_openai.requests()
    assert "stream" not in sent
    assert fake_openai.stats()["streams"] == 0


async def test_the_model_is_called_while_generation_started_waits_for_its_confirm(
    start_generator, fake_openai, bus
):
    """GenerationStarted's confirm no longer holds the call back (under load 10-30 ms an
    attempt); nothing else of the attempt is published before it is confirmed."""
    release = asyncio.Event()
    gate = uuid.uuid4().hex
    async with start_generator() as service:
        worker = service.worker
        publish = worker._publish

        async def held(envelope: Envelope) -> None:
            if envelope.type == "GenerationStarted":
                await release.wait()  # the broker's confirm, slow to come
            await publish(envelope)

        worker._publish = held
        in_flight = fake_openai.stats()["in_flight"]
        request = generation_request(f"a short flow [[fake:objects=4,gate={gate}]]")
        await bus.publish(request)

        async def calling() -> bool:
            return bool(fake_openai.stats()["in_flight"] == in_flight + 1)

        await eventually(calling, what="the model called while GenerationStarted is held")
        fake_openai.open_gate(gate)
        await eventually(lambda: _done(fake_openai, in_flight), what="the reply read to its end")
        await asyncio.sleep(0.2)  # its objects parsed and handed on
        assert bus.seen.empty()  # no progress and no result before GenerationStarted
        release.set()
        messages = (await bus.results(request))[str(request.job_id)]
    assert milestones(messages) == ["GenerationStarted", "GenerationSucceeded"]
    assert messages[0].type == "GenerationStarted"
    assert [e.index for e in progressed(messages)] == [0, 1, 2, 3]


async def _done(fake_openai: FakeOpenAI, in_flight: int) -> bool:
    return bool(fake_openai.stats()["in_flight"] == in_flight)


async def test_a_generation_started_never_confirmed_ends_the_call_and_publishes_nothing(
    start_generator, fake_openai, bus
):
    gate = uuid.uuid4().hex
    refused: list[Envelope] = []
    async with start_generator() as service:
        worker = service.worker
        publish = worker._publish

        async def refuse_started(envelope: Envelope) -> None:
            if envelope.type == "GenerationStarted":
                await asyncio.sleep(0.05)  # the call is out by then
                refused.append(envelope)
                raise PublishError("the broker refused it")
            await publish(envelope)

        worker._publish = refuse_started
        request = generation_request(f"a short flow [[fake:objects=4,gate={gate}]]")
        await bus.publish(request)
        # The run ends with the error, and the work comes back from the queue.
        await eventually(lambda: len(refused) >= 2, what="the attempt handed out again")
        fake_openai.open_gate(gate)
        await asyncio.sleep(0.3)  # a call still going would have read its reply by now
        assert bus.seen.empty()  # no progress and no result without GenerationStarted
