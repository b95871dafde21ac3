"""``canvas-generator`` and ``canvas-fake-openai`` as real processes: settings, health,
readiness, metrics, JSON logs and a graceful stop."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from canvas_events.events import GenerationSucceeded
from tests.generator.conftest import API_KEY, JWT_SECRET, generation_request, milestones
from tests.support.fake_openai import FakeOpenAI
from tests.support.processes import ServiceProcess, free_port
from tests.support.waiting import eventually

BIN = Path(sys.executable).parent


def _run(command, env, timeout=30):
    return subprocess.run(
        [str(BIN / command)],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.asynccontextmanager
async def _generator_process(
    log_dir: Path, ready_path: str, **env: str
) -> AsyncIterator[tuple[ServiceProcess, httpx.AsyncClient]]:
    """``canvas-generator`` on a free port with ``env`` (and JWT_SECRET), once
    ``ready_path`` answers 200, and an HTTP client for it; SIGTERM after the block
    (``stop()`` then gives its exit code)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**env, "GENERATOR_PORT": str(port), "JWT_SECRET": JWT_SECRET}
    generator = ServiceProcess("generator", ["canvas-generator"], env, log_dir, url + ready_path)
    generator.start()
    try:
        await generator.wait_ready()
        async with httpx.AsyncClient(base_url=url) as client:
            yield generator, client
    finally:
        generator.stop()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_CONCURRENT_JOBS", "0"),
        ("OPENAI_TIMEOUT_SECONDS", "-1"),
        ("GENERATOR_PORT", "x"),
        ("OPENAI_STREAM", "sometimes"),
    ],
)
def test_bad_setting_stops_the_generator_with_exit_2_naming_it(name, value):
    done = _run(
        "canvas-generator", {name: value, "OPENAI_API_KEY": API_KEY, "JWT_SECRET": JWT_SECRET}
    )
    assert done.returncode == 2
    assert name in done.stderr
    assert API_KEY not in done.stderr + done.stdout


def test_generator_without_jwt_secret_refuses_to_start_naming_it():
    done = _run("canvas-generator", {"OPENAI_API_KEY": API_KEY})
    assert done.returncode == 2
    assert "invalid setting JWT_SECRET: Value error, is required" in done.stderr


def test_bad_knob_stops_the_stand_in_with_exit_2_naming_it():
    done = _run("canvas-fake-openai", {"FAKE_OPENAI_FAILURE_RATE": "2"})
    assert done.returncode == 2
    assert "FAKE_OPENAI_FAILURE_RATE" in done.stderr


async def test_stand_in_fails_on_purpose_as_its_environment_says():
    with FakeOpenAI(failure_rate=1, failure_modes="garbage") as fake:
        client = openai.AsyncOpenAI(api_key="sk-any", base_url=fake.base_url, max_retries=0)
        async with client:
            reply = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "a flow"}]
            )
        assert not (reply.choices[0].message.content or "").lstrip().startswith("{")
        assert fake.stats()["failures"] == {"garbage": 1}


async def test_generator_process_works_a_request_and_logs_json_lines(
    amqp_url, topology, fake_openai, bus, tmp_path
):
    async with _generator_process(
        tmp_path,
        "/ready",
        AMQP_URL=amqp_url,
        AMQP_TOPOLOGY_PREFIX=topology.prefix,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=fake_openai.base_url,
        LOG_FORMAT="json",
    ) as (generator, client):
        assert (await client.get("/health")).status_code == 200
        request = generation_request("a flowchart of a login process")
        await bus.publish(request)
        messages = (await bus.results(request))[str(request.job_id)]

        async def attempt_measured():
            text = (await client.get("/metrics")).text
            return 'canvas_generation_attempt_seconds_count{outcome="succeeded"} 1.0' in text

        # The attempt is measured just after its result is published.
        await eventually(attempt_measured, what="the attempt in /metrics")
        metrics = (await client.get("/metrics")).text
    assert generator.stop() == 0
    assert milestones(messages) == ["GenerationStarted", "GenerationSucceeded"]
    result = GenerationSucceeded.model_validate(messages[-1].data)
    # Streamed by default: each object was published on its own before the result.
    assert [m.data["object"] for m in messages[1:-1]] == result.objects
    for name in (
        "canvas_openai_request_seconds_count 1.0",
        'canvas_openai_errors_total{kind="invalid_api_key"} 0.0',
        'canvas_generation_attempt_seconds_count{outcome="succeeded"} 1.0',
        "canvas_generations_in_flight 0.0",
        f"canvas_progress_publish_seconds_count {len(result.objects)}.0",
        "canvas_generation_first_object_seconds_count 1.0",
    ):
        assert name in metrics
    lines = generator.log_lines()  # fails on any line that is not JSON
    steps = {line["event"]: line for line in lines if line.get("job_id") == str(request.job_id)}
    assert {"attempt started", "openai call made", "objects parsed"} <= set(steps)
    for line in steps.values():
        assert line["service"] == "ai-generator"
        assert line["correlation_id"] == request.correlation_id
        assert line["level"] in ("info", "warning")
        assert line["timestamp"].endswith("Z")
    assert steps["openai call made"]["total_tokens"] > 0
    assert steps["objects parsed"]["dropped"] == 0
    assert API_KEY not in generator.log_path.read_text()


async def test_generator_without_broker_is_alive_but_not_ready(tmp_path):
    broker = f"amqp://guest:hunter2-secret@127.0.0.1:{free_port()}/"
    async with _generator_process(tmp_path, "/health", AMQP_URL=broker) as (generator, client):

        async def reason_given():
            ready = await client.get("/ready")
            return ready.status_code == 503 and ready.json()["checks"]["broker"] != "ok"

        await eventually(reason_given, what="/ready 503 with the broker's reason")
        assert "hunter2-secret" not in (await client.get("/ready")).text
    assert generator.stop() == 0
    log = generator.log_path.read_text()
    assert "OPENAI_API_KEY is not set" in log
    assert "hunter2-secret" not in log
