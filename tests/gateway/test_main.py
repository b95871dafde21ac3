"""The console script: the token subcommand, bad settings, and the real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest

from canvas_events.auth import decode_token
from canvas_events.settings import DEV_JWT_SECRET
from canvas_events.topology import Topology
from canvas_gateway.__main__ import main
from canvas_gateway.settings import Settings
from tests.support.processes import free_port
from tests.support.schema import apply_orchestrator_schema
from tests.support.waiting import eventually


def test_token_command_prints_a_token_signed_with_jwt_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JWT_SECRET", "a-secret-for-this-test-only-0123456789abcdef")
    main(["token", "--user", "carol", "--admin", "--ttl-hours", "2"])
    printed = capsys.readouterr()
    principal = decode_token(printed.out.strip(), "a-secret-for-this-test-only-0123456789abcdef")
    assert principal.user_id == "carol"
    assert principal.is_admin
    assert printed.err == ""


def test_token_command_warns_about_the_development_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("JWT_SECRET", raising=False)
    monkeypatch.setenv("CANVAS_ENV", "development")
    main(["token", "--user", "dave"])
    printed = capsys.readouterr()
    assert decode_token(printed.out.strip(), DEV_JWT_SECRET).user_id == "dave"
    assert "JWT_SECRET is not set" in printed.err


@pytest.mark.parametrize("secret", [None, "", "too-short"])
def test_without_a_usable_jwt_secret_it_refuses_to_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], secret: str | None
) -> None:
    monkeypatch.delenv("CANVAS_ENV", raising=False)
    if secret is None:
        monkeypatch.delenv("JWT_SECRET", raising=False)
    else:
        monkeypatch.setenv("JWT_SECRET", secret)
    for argv in ([], ["token", "--user", "eve"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "invalid setting JWT_SECRET" in err
        assert DEV_JWT_SECRET not in err


def test_bad_setting_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAX_ACTIVE_JOBS_PER_USER", "lots")
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "MAX_ACTIVE_JOBS_PER_USER" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5"])
def test_a_bad_daily_token_budget_exits_2_naming_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("USER_DAILY_TOKEN_BUDGET", value)
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "USER_DAILY_TOKEN_BUDGET" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "budget"), [("", None), ("50000", 50_000)])
def test_an_empty_daily_token_budget_is_no_limit(
    value: str, budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER_DAILY_TOKEN_BUDGET", value)
    assert Settings(jwt_secret="x" * 32).user_daily_token_budget == budget


@pytest.mark.e2e
async def test_gateway_process_serves_logs_json_and_stops_on_sigterm(
    database_url: str, amqp_url: str, topology: Topology
) -> None:
    await apply_orchestrator_schema(database_url)
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("JWT_SECRET", "LOG_FORMAT", "LOG_LEVEL")
    }
    env |= {
        "DATABASE_URL": database_url,
        "AMQP_URL": amqp_url,
        "AMQP_TOPOLOGY_PREFIX": topology.prefix,
        "GATEWAY_PORT": str(port),
        # No JWT_SECRET: the development secret, said loudly.
        "CANVAS_ENV": "development",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "canvas_gateway",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def ready() -> bool:
                if process.returncode is not None:
                    pytest.fail(f"gateway exited with {process.returncode}")
                try:
                    return (await client.get("/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, what="the gateway process to be ready")
            response = await client.get("/health", headers={"X-Request-ID": "e2e-1"})
            assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode == 0, stderr.decode()
    lines: list[dict[str, Any]] = [json.loads(line) for line in stdout.decode().splitlines()]
    assert all(line["service"] == "gateway" and "timestamp" in line for line in lines)
    assert any(
        line["level"] == "warning" and "JWT_SECRET IS NOT SET" in line["event"] for line in lines
    )
    [request] = [line for line in lines if line.get("correlation_id") == "e2e-1"]
    assert (request["event"], request["route"], request["status"]) == ("request", "/health", 200)
