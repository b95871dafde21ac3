"""The ``canvas-orchestrator`` command as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from uuid import uuid4

import httpx
import orjson
import pytest

from canvas_events.envelope import Envelope
from canvas_events.events import JobQueued, JobRequested
from canvas_orchestrator.projections import project
from canvas_store.events import append
from tests.orchestrator.harness import JWT_SECRET, eventually

COMMAND = str(Path(sys.executable).parent / "canvas-orchestrator")


def environment(**values: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"OPENAI_TIMEOUT_SECONDS", "GENERATION_LEASE_SECONDS", "MAX_JOB_RETRIES"}
    }
    env["JWT_SECRET"] = JWT_SECRET
    env.update(values)
    return env


async def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        COMMAND,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"MAX_JOB_RETRIES": "lots"}, "MAX_JOB_RETRIES"),
        ({"ORCHESTRATOR_PORT": "70000"}, "ORCHESTRATOR_PORT"),
        ({"MODEL_REQUESTS_PER_MINUTE": "0"}, "MODEL_REQUESTS_PER_MINUTE"),
        ({"MODEL_TOKENS_PER_MINUTE": "many"}, "MODEL_TOKENS_PER_MINUTE"),
        (
            {"OPENAI_TIMEOUT_SECONDS": "60", "GENERATION_LEASE_SECONDS": "30"},
            "GENERATION_LEASE_SECONDS",
        ),
    ],
)
async def test_a_bad_setting_stops_the_service_with_exit_2_naming_the_variable(
    values: dict[str, str], variable: str
):
    code, _, stderr = await run(env=environment(**values))

    assert code == 2
    assert variable in stderr


async def test_without_jwt_secret_it_refuses_to_start_naming_it():
    env = environment()
    del env["JWT_SECRET"]
    env.pop("CANVAS_ENV", None)

    code, _, stderr = await run(env=env)

    assert code == 2
    assert "invalid setting JWT_SECRET: Value error, is required" in stderr


async def test_rebuild_projections_command_restores_the_read_models(pool, database_url):
    job_id = uuid4()
    request = Envelope.wrap(
        JobRequested(query="q", canvas_id="canvas-9", priority=4),
        correlation_id="corr",
        job_id=job_id,
        user_id="alice",
        canvas_id="canvas-9",
    )
    async with pool.acquire() as conn, conn.transaction():
        recorded = await append(
            conn, job_id, 0, [request, request.follow(JobQueued(priority=4, retry_count=0))]
        )
        await project(conn, recorded)
    before = [dict(row) for row in await pool.fetch("SELECT * FROM jobs")]
    await pool.execute("DELETE FROM jobs")

    code, stdout, stderr = await run(
        "rebuild-projections", env=environment(DATABASE_URL=database_url)
    )

    assert code == 0, stderr
    assert "rebuilt from 2 events" in stdout
    assert [dict(row) for row in await pool.fetch("SELECT * FROM jobs")] == before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.e2e
async def test_service_serves_health_and_json_logs_and_stops_cleanly_on_sigterm(
    database_url, amqp_url, topology
):
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        COMMAND,
        env=environment(
            DATABASE_URL=database_url,
            AMQP_URL=amqp_url,
            AMQP_TOPOLOGY_PREFIX=topology.prefix,
            ORCHESTRATOR_PORT=str(port),
            LOG_FORMAT="json",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def ready() -> bool:
                try:
                    return (await http.get("/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, what="the orchestrator to be ready")
            assert (await http.get("/health")).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)

    assert process.returncode == 0, stderr.decode()
    lines = [orjson.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    assert lines
    assert all(line["service"] == "job-orchestrator" for line in lines)
    assert {"timestamp", "level", "event"} <= set(lines[0])
    events = [line["event"] for line in lines]
    assert "relay active" in events
    assert "orchestrator stopped" in events
