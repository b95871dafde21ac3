"""Before each model call the generator asks the orchestrator whether the attempt is
still current: not current → skipped without a model call; no usable answer → it goes
ahead (fail-open). An attempt past its lease is skipped without asking. Real RabbitMQ,
the stand-in model as a process, a stand-in orchestrator on real HTTP."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
import pytest

from canvas_events.auth import ServiceCredential, decode_token
from canvas_generator.checks import AttemptChecker, Verdict
from canvas_generator.service import Service
from tests.generator.conftest import (
    JWT_SECRET,
    NO_ORCHESTRATOR,
    Answer,
    generation_request,
    milestones,
)
from tests.support.waiting import eventually


def skipped(generator: Service, reason: str) -> float:
    """Attempts ``generator`` dropped for ``reason`` (its own registry: starts at 0)."""
    value = generator.metrics.registry.get_sample_value(
        "canvas_generation_skipped_total", {"reason": reason}
    )
    return value or 0.0


async def test_attempt_the_orchestrator_calls_not_current_is_skipped_without_a_model_call(
    start_generator, topology, fake_openai, bus, orchestrator
):
    marker = uuid.uuid4().hex
    stale = generation_request(f"a drawing of a cancelled job {marker}")
    orchestrator.answers[str(stale.data["attempt_id"])] = Answer(current=False, status="cancelled")
    async with start_generator(orchestrator_url=orchestrator.url) as generator:
        await bus.publish(stale)
        await eventually(lambda: skipped(generator, "not_current") == 1, what="the attempt skipped")
        current = generation_request("a drawing of a live job")
        await bus.publish(current)
        results = await bus.results(current)
    assert milestones(results[str(current.job_id)]) == [
        "GenerationStarted",
        "GenerationSucceeded",
    ]
    # Nothing at all was published for the skipped attempt, and the model never saw it.
    assert set(results) == {str(current.job_id)}
    assert bus.seen.empty()
    assert not any(marker in str(body) for body in fake_openai.requests())
    # Asked by attempt, with the job id (the orchestrator's primary key).
    assert (str(stale.data["attempt_id"]), str(stale.job_id)) in orchestrator.asked
    assert await bus.queue_depth(topology.generator_work.name) == 0


async def test_attempt_dispatched_after_the_control_queue_exists_is_not_asked_about(
    start_generator, bus, orchestrator
):
    # A cancel of a job dispatched now reaches this generator's control queue, so the
    # orchestrator is asked only about attempts that may predate that queue.
    async with start_generator(orchestrator_url=orchestrator.url) as generator:
        fresh = generation_request("a drawing dispatched while the generator runs")
        bound = generator.broker.connected_at
        assert bound is not None
        fresh = fresh.model_copy(update={"occurred_at": bound + timedelta(seconds=6)})
        await bus.publish(fresh)
        results = await bus.results(fresh)
    assert milestones(results[str(fresh.job_id)]) == ["GenerationStarted", "GenerationSucceeded"]
    assert str(fresh.data["attempt_id"]) not in orchestrator.attempts_asked()


@pytest.mark.parametrize(
    "answer",
    [
        None,  # nothing listens at ORCHESTRATOR_URL
        Answer(delay=5.0),  # answers after the check's timeout
        Answer(status_code=500),
        Answer(status_code=404),
        Answer(body={"unexpected": "shape"}),
    ],
    ids=["unreachable", "too-slow", "error-500", "unknown-job-404", "nonsense"],
)
async def test_attempt_goes_ahead_when_the_orchestrator_cannot_say(
    run_requests, orchestrator, answer
):
    request = generation_request("a flowchart of a login process")
    if answer is not None:
        orchestrator.answers[str(request.data["attempt_id"])] = answer
    results = await run_requests(
        request,
        orchestrator_url=NO_ORCHESTRATOR if answer is None else orchestrator.url,
        orchestrator_timeout_seconds=0.5,
    )
    assert milestones(results[str(request.job_id)]) == [
        "GenerationStarted",
        "GenerationSucceeded",
    ]


async def test_attempt_past_its_lease_is_skipped_without_asking_anyone(
    start_generator, fake_openai, bus, orchestrator
):
    marker = uuid.uuid4().hex
    expired = generation_request(f"too late {marker}", lease=timedelta(seconds=-1))
    async with start_generator(orchestrator_url=orchestrator.url) as generator:
        await bus.publish(expired)
        await eventually(
            lambda: skipped(generator, "lease_expired") == 1, what="the attempt skipped"
        )
        later = generation_request("in time")
        await bus.publish(later)
        results = await bus.results(later)
    assert set(results) == {str(later.job_id)}
    assert str(expired.data["attempt_id"]) not in orchestrator.attempts_asked()
    assert not any(marker in str(body) for body in fake_openai.requests())


def _checker(handler) -> AttemptChecker:
    return AttemptChecker(
        "http://orchestrator.test", timeout=1, transport=httpx.MockTransport(handler)
    )


async def test_checker_reads_the_orchestrators_verdict_and_status():
    job_id, attempt_id = uuid.uuid4(), uuid.uuid4()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        current = request.url.params["job_id"] == str(job_id)
        status = "processing" if current else "cancelled"
        return httpx.Response(200, json={"current": current, "status": status})

    checker = _checker(handler)
    try:
        yes = await checker.check(job_id, attempt_id)
        no = await checker.check(uuid.uuid4(), attempt_id)
    finally:
        await checker.aclose()
    assert (yes.verdict, yes.status) == (Verdict.CURRENT, "processing")
    assert (no.verdict, no.status) == (Verdict.NOT_CURRENT, "cancelled")
    assert seen[0].url.path == f"/internal/attempts/{attempt_id}"


async def test_checker_shows_a_service_credential_signed_with_jwt_secret():
    tokens: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        tokens.append(request.headers["authorization"].removeprefix("Bearer "))
        return httpx.Response(200, json={"current": True, "status": "queued"})

    checker = AttemptChecker(
        "http://orchestrator.test",
        timeout=1,
        credential=ServiceCredential("ai-generator", JWT_SECRET),
        transport=httpx.MockTransport(handler),
    )
    try:
        await checker.check(uuid.uuid4(), uuid.uuid4())
        await checker.check(uuid.uuid4(), uuid.uuid4())
    finally:
        await checker.aclose()
    caller = decode_token(tokens[0], JWT_SECRET)
    assert caller.is_service and caller.user_id == "service:ai-generator"
    assert tokens[1] == tokens[0]  # minted once, not per call


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="not json"),
        httpx.Response(200, json=["a", "list"]),
        httpx.Response(200, json={"current": "yes"}),
        httpx.Response(503, json={"detail": "database away"}),
    ],
    ids=["not-json", "not-an-object", "not-a-bool", "503"],
)
async def test_checker_says_unknown_rather_than_guess(response):
    checker = _checker(lambda _: response)
    try:
        check = await checker.check(uuid.uuid4(), uuid.uuid4())
    finally:
        await checker.aclose()
    assert check.verdict is Verdict.UNKNOWN
    assert check.detail
