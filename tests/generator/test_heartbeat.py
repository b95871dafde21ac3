"""The generator's heartbeat (canvas_generator.heartbeat): what it announces to the
orchestrator for fair dispatch, with its service credential, and that a failing
orchestrator neither stops it nor raises."""

from __future__ import annotations

import asyncio
import json

import httpx

from canvas_events.auth import ServiceCredential
from canvas_generator.heartbeat import Heartbeat

SECRET = "heartbeat-tests-secret-0123456789-abcdefgh"


async def test_it_announces_capacity_and_running_then_zero_as_it_stops():
    seen: list[tuple[str, dict[str, object], str | None]] = []
    connected = {"value": True}

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, body, request.headers.get("authorization")))
        return httpx.Response(204)

    beat = Heartbeat(
        "http://orchestrator",
        generator_id="gen-1",
        capacity=lambda: 20 if connected["value"] else 0,
        running=lambda: 3,
        timeout=1.0,
        credential=ServiceCredential("ai-generator", SECRET),
        transport=httpx.MockTransport(answer),
        interval=0.05,
    )
    await beat.start()
    await asyncio.sleep(0.12)
    connected["value"] = False
    await asyncio.sleep(0.1)
    await beat.stop(2)
    paths = {path for path, _, _ in seen}
    assert paths == {"/internal/generators/heartbeat"}
    assert seen[0][1] == {"generator_id": "gen-1", "capacity": 20, "running": 3}
    assert all(auth is not None and auth.startswith("Bearer ") for _, _, auth in seen)
    # Disconnected from the broker: no capacity; and the last word, as it stops, is 0.
    assert seen[-2][1]["capacity"] == 0
    assert seen[-1][1]["capacity"] == 0
    assert len(seen) >= 4


async def test_a_failing_orchestrator_is_tried_again_without_raising():
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("refused")
        return httpx.Response(503 if calls == 2 else 204)

    beat = Heartbeat(
        "http://orchestrator",
        generator_id="gen-1",
        capacity=lambda: 5,
        running=lambda: 0,
        timeout=1.0,
        transport=httpx.MockTransport(answer),
    )
    assert await beat.beat() is False
    assert await beat.beat() is False
    assert await beat.beat() is True
    assert calls == 3
