"""Cancels reach the generator through its control queue: an attempt in its model call
is aborted (the stand-in sees the client hang up) and publishes nothing; an attempt of a
job cancelled earlier never calls the model. Real RabbitMQ, the stand-in as a process."""

from __future__ import annotations

import uuid

import pytest

from canvas_events.envelope import Envelope
from canvas_events.events import JobCancelled
from canvas_generator.cancellations import RecentlyCancelled
from tests.generator.conftest import (
    cancel_message,
    generation_request,
    messages_until_a_later_attempt_ends,
    milestones,
    wait_aborted,
)
from tests.support.waiting import eventually


@pytest.mark.parametrize("requested", [False, True], ids=["JobCancelled", "JobCancelRequested"])
async def test_cancel_during_the_model_call_aborts_it_and_publishes_no_result(
    start_generator, topology, fake_openai, bus, requested
):
    # A model call that never answers on its own: only an abort ends it before the
    # 60 s timeout, far beyond the deadlines below.
    marker = uuid.uuid4().hex
    async with start_generator(openai_timeout_seconds=60) as generator:
        before = fake_openai.stats()
        request = generation_request(f"a slow drawing {marker} [[fake:timeout]]")
        await bus.publish(request)
        assert (await bus.next()).type == "GenerationStarted"
        await eventually(
            lambda: fake_openai.stats()["in_flight"] == before["in_flight"] + 1,
            what="the model call in flight",
        )
        assert generator.cancellations.in_flight == 1

        await bus.publish(
            cancel_message(request, requested=requested),
            f"job.{'JobCancelRequested' if requested else 'JobCancelled'}",
        )

        await wait_aborted(generator, fake_openai, before)
        assert fake_openai.stats()["calls"] == before["calls"] + 1
        seen = await messages_until_a_later_attempt_ends(bus)
    # Its GenerationStarted was taken above; no result followed it.
    assert seen.get(str(request.job_id), []) == []
    assert await bus.queue_depth(topology.generator_work.name) == 0


async def test_attempt_of_a_job_cancelled_earlier_never_calls_the_model(
    start_generator, fake_openai, bus
):
    marker = uuid.uuid4().hex
    async with start_generator() as generator:
        request = generation_request(f"a drawing nobody wants any more {marker}")
        await bus.publish(cancel_message(request), "job.JobCancelled")
        await eventually(
            lambda: request.job_id in generator.cancellations.recent,
            what="the cancel heard",
        )
        await bus.publish(request)
        await eventually(
            lambda: (
                generator.metrics.registry.get_sample_value(
                    "canvas_generation_skipped_total", {"reason": "cancelled"}
                )
                == 1
            ),
            what="the attempt skipped",
        )
        seen = await messages_until_a_later_attempt_ends(bus)
    assert seen.get(str(request.job_id), []) == []
    assert not any(marker in str(body) for body in fake_openai.requests())


async def test_cancel_of_another_job_leaves_the_attempt_in_flight_alone(
    start_generator, fake_openai, bus
):
    async with start_generator() as generator:
        before = fake_openai.stats()["in_flight"]
        # Answers only once a second call is in flight: it is surely in flight when the
        # other job's cancel arrives.
        first = generation_request("first of a pair [[fake:together=2]]")
        await bus.publish(first)
        await eventually(
            lambda: fake_openai.stats()["in_flight"] == before + 1, what="the first call"
        )
        other = generation_request("some other job")
        await bus.publish(cancel_message(other), "job.JobCancelled")
        await eventually(
            lambda: other.job_id in generator.cancellations.recent, what="the cancel heard"
        )
        second = generation_request("second of a pair [[fake:together=2]]")
        await bus.publish(second)
        results = await bus.results(first, second)
    assert milestones(results[str(first.job_id)]) == [
        "GenerationStarted",
        "GenerationSucceeded",
    ]
    assert results[str(second.job_id)][-1].type == "GenerationSucceeded"


async def test_bad_control_messages_are_dead_lettered_and_cancels_still_work(
    start_generator, topology, bus
):
    async with start_generator() as generator:
        await bus.publish_raw(b"not an envelope", "job.JobCancelled")
        no_job = Envelope.wrap(JobCancelled(reason="no job named"), correlation_id="c-1")
        await bus.publish(no_job, "job.JobCancelled")
        request = generation_request("x")
        await bus.publish(cancel_message(request), "job.JobCancelled")
        await eventually(
            lambda: request.job_id in generator.cancellations.recent, what="the cancel heard"
        )
        dead_letters = f"{topology.prefix}.ai-generator.control.dlq"

        async def both_dead_lettered():
            return await bus.queue_depth(dead_letters) == 2

        await eventually(both_dead_lettered, what="the two bad messages dead-lettered")


def test_recently_cancelled_forgets_after_its_time_to_live():
    now = [1000.0]
    recent = RecentlyCancelled(ttl_seconds=60, clock=lambda: now[0])
    old, new = uuid.uuid4(), uuid.uuid4()
    recent.add(old)
    now[0] += 30
    recent.add(new)
    assert old in recent and new in recent
    now[0] += 31
    assert old not in recent
    assert new in recent
    now[0] += 30
    assert len(recent) == 0


def test_recently_cancelled_keeps_only_the_newest_when_full():
    recent = RecentlyCancelled(max_entries=3)
    jobs = [uuid.uuid4() for _ in range(5)]
    for job in jobs:
        recent.add(job)
    assert len(recent) == 3
    assert [job in recent for job in jobs] == [False, False, True, True, True]
    recent.add(jobs[2])  # cancelled again: the newest now
    recent.add(uuid.uuid4())
    assert jobs[2] in recent and jobs[3] not in recent
