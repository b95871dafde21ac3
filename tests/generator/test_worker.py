"""The generator's worker on the real RabbitMQ, calling the stand-in model (a real
process) with the real openai client."""

from __future__ import annotations

from canvas_events.events import GenerationFailed, GenerationStarted, GenerationSucceeded
from canvas_events.objects import validate_object
from canvas_generator.prompt import SYSTEM_PROMPT
from tests.generator.conftest import API_KEY, generation_request, milestones
from tests.support.processes import free_port
from tests.support.waiting import eventually


async def test_request_yields_started_then_succeeded_with_objects(run_one):
    request, messages = await run_one("a flowchart of a login process")
    assert milestones(messages) == ["GenerationStarted", "GenerationSucceeded"]
    for message in messages:
        # Envelopes follow the request: same job, user, canvas and correlation.
        assert message.causation_id == request.event_id
        assert (message.job_id, message.user_id, message.canvas_id, message.correlation_id) == (
            request.job_id,
            request.user_id,
            request.canvas_id,
            request.correlation_id,
        )
    started = GenerationStarted.model_validate(messages[0].data)
    assert started.attempt_id == GenerationSucceeded.model_validate(messages[-1].data).attempt_id
    assert started.model == "gpt-4o-mini"
    assert started.generator_id.startswith("ai-generator-")
    result = GenerationSucceeded.model_validate(messages[-1].data)
    assert 3 <= len(result.objects) <= 12
    assert all(validate_object(obj) == obj for obj in result.objects)
    assert result.dropped_objects == 0
    # What the server says answered: the stand-in, naming the model asked for.
    assert result.model == "canvas-stand-in (asked: gpt-4o-mini)"
    assert set(result.usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert result.usage["total_tokens"] == (
        result.usage["prompt_tokens"] + result.usage["completion_tokens"]
    )
    assert result.latency_ms >= 0


async def test_model_is_asked_for_json_with_the_query_only_in_the_user_message(
    run_one, fake_openai
):
    fake_openai.reset()
    query = "a mind map of \x07 holidays [[fake:objects=4]]"
    await run_one(query)
    (sent,) = fake_openai.requests()
    assert sent["model"] == "gpt-4o-mini"
    assert sent["response_format"] == {"type": "json_object"}
    # Streamed, with the usage in a last chunk (OPENAI_STREAM defaults to true).
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "a mind map of holidays [[fake:objects=4]]"},
    ]


async def test_invalid_objects_are_dropped_and_counted(run_one):
    _, messages = await run_one("a pipeline [[fake:objects=5,invalid=3,fence]]")
    result = GenerationSucceeded.model_validate(messages[-1].data)
    assert len(result.objects) == 5
    assert result.dropped_objects == 3


async def test_key_rejected_by_the_model_fails_permanently_without_the_key(run_one):
    wrong_key = "sk-wrong-key-for-this-test-abcdef"
    _, messages = await run_one("a flowchart", openai_api_key=wrong_key)
    assert [m.type for m in messages] == ["GenerationStarted", "GenerationFailed"]
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert failed.retryable is False
    assert failed.kind == "invalid_api_key"
    assert "401" in failed.error
    assert "API key" in failed.error
    for secret in (wrong_key, wrong_key[-4:], API_KEY):
        assert secret not in messages[-1].to_json().decode()


async def test_missing_api_key_fails_permanently_without_calling_the_model(run_one, fake_openai):
    fake_openai.reset()
    _, messages = await run_one("a flowchart", openai_api_key=None)
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert failed.error == "OpenAI API key is required but not configured"
    assert (failed.kind, failed.retryable) == ("missing_api_key", False)
    assert fake_openai.stats()["calls"] == 0


async def test_garbage_reply_fails_retryable_as_bad_output(run_one):
    _, messages = await run_one("x [[fake:garbage]]")
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert (failed.kind, failed.retryable) == ("bad_output", True)


async def test_reply_without_valid_objects_fails_retryable(run_one):
    _, messages = await run_one("x [[fake:empty]]")
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert (failed.kind, failed.retryable) == ("bad_output", True)
    assert failed.error == "model output had no valid object"


async def test_truncated_reply_fails_retryable_and_says_it_was_cut(run_one):
    # Not streamed: the reply arrives whole, cut at its length limit (finish_reason
    # "length"). A stream cut off midway is in test_streaming.py.
    _, messages = await run_one("x [[fake:cut]]", openai_stream=False)
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert (failed.kind, failed.retryable) == ("bad_output", True)
    assert "cut off" in failed.error


async def test_server_error_fails_retryable(run_one):
    _, messages = await run_one("x [[fake:status=503]]")
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert (failed.kind, failed.retryable) == ("server_error", True)
    assert "503" in failed.error


async def test_rate_limit_fails_retryable_with_retry_after(run_one):
    _, messages = await run_one("x [[fake:status=429,retry_after=12]]")
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert (failed.kind, failed.retryable) == ("rate_limited", True)
    assert failed.retry_after_seconds == 12


async def test_model_that_does_not_answer_in_time_fails_retryable(run_one):
    _, messages = await run_one("x [[fake:timeout]]", openai_timeout_seconds=0.5)
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert (failed.kind, failed.retryable) == ("timeout", True)


async def test_unreachable_model_fails_retryable(run_one):
    _, messages = await run_one("x", openai_base_url=f"http://127.0.0.1:{free_port()}/v1")
    failed = GenerationFailed.model_validate(messages[-1].data)
    assert (failed.kind, failed.retryable) == ("connection", True)


async def test_attempts_run_concurrently_up_to_max_concurrent_jobs(run_requests, fake_openai):
    fake_openai.reset()
    # Each call answers only once five are in flight: all five finish only if the
    # worker runs them at the same time.
    requests = [generation_request(f"job {i} [[fake:together=5]]") for i in range(5)]
    results = await run_requests(*requests, max_concurrent_jobs=5)
    assert all(got[-1].type == "GenerationSucceeded" for got in results.values())
    assert fake_openai.stats()["max_in_flight"] == 5


async def test_no_more_than_max_concurrent_jobs_run_at_once(run_requests, fake_openai):
    fake_openai.reset()
    requests = [generation_request(f"job {i} [[fake:delay_ms=100]]") for i in range(5)]
    await run_requests(*requests, max_concurrent_jobs=2)
    stats = fake_openai.stats()
    assert stats["calls"] == 5
    assert stats["max_in_flight"] <= 2


async def test_stop_finishes_attempts_in_flight_and_takes_no_new_work(
    start_generator, topology, fake_openai, bus
):
    fake_openai.reset()
    requests = [generation_request(f"job {i} [[fake:delay_ms=400]]") for i in range(4)]
    async with start_generator(max_concurrent_jobs=2):
        for request in requests:
            await bus.publish(request)
        await eventually(lambda: fake_openai.stats()["in_flight"] == 2, what="2 calls in flight")
    # Stopped: the two in flight finished, the other two wait in the queue, untouched.
    results = await bus.results(*requests[:2])
    assert all(got[-1].type == "GenerationSucceeded" for got in results.values())
    assert bus.seen.empty()
    assert await bus.queue_depth(topology.generator_work.name) == 2
    assert fake_openai.stats()["calls"] == 2


async def test_unparseable_work_is_dead_lettered_and_the_worker_goes_on(
    start_generator, topology, bus
):
    async with start_generator():
        await bus.publish_raw(b"this is not an envelope")
        request = generation_request("a flowchart")
        await bus.publish(request)
        results = await bus.results(request)
        assert results[str(request.job_id)][-1].type == "GenerationSucceeded"
        dead_letters = topology.generator_work.dead_letter_queue

        async def dead_lettered():
            return await bus.queue_depth(dead_letters) == 1

        await eventually(dead_lettered, what="the bad message dead-lettered")
