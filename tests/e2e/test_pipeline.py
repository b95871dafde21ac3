"""A prompt posted to the gateway becomes objects on a canvas, and every step reaches
the client over a WebSocket: four services and the stand-in model as real processes."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
import websockets

from tests.support.system import JWT_SECRET, OPENAI_KEY, System
from tests.support.users import User

pytestmark = pytest.mark.e2e


async def test_prompt_becomes_objects_on_the_canvas_with_live_updates(system: System) -> None:
    async with User(system, "alice") as alice, alice.socket() as socket:
        accepted = await alice.http.post(
            "/api/ai-agent/create-canvas",
            json={"query": "a flowchart of a login flow"},
            headers={"X-Request-ID": "e2e-happy-path"},
        )
        assert accepted.status_code == 202, accepted.text
        body = accepted.json()
        job_id, canvas_id = body["job_id"], body["canvas_id"]
        assert body["status"] == "queued"

        # Read-your-writes: the job is there right after the 202.
        await alice.status(job_id)

        frames = await socket.until_final(job_id)
        types = [f["type"] for f in frames if f["type"] != "ai_generation_progress"]
        assert types == ["ai_job_queued", "ai_generation_started", "ai_generation_completed"]
        positions = [f["position"] for f in frames]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        assert all(f["canvas_id"] == canvas_id for f in frames)
        completed = frames[-1]["data"]
        assert completed["object_count"] >= 1

        final = await alice.status(job_id)
        assert final["status"] == "completed"
        assert final["result"]["object_count"] == completed["object_count"]
        assert final["result"]["model"]
        assert final["result"]["usage"]["total_tokens"] > 0
        assert final["started_at"] and final["completed_at"]

        drawn = await alice.objects(canvas_id)
        assert len(drawn) == completed["object_count"]
        assert {o["id"] for o in drawn} == set(final["result"]["object_ids"])
        assert all(o["job_id"] == job_id and o["type"] for o in drawn)

    # Another user sees neither the job nor the canvas.
    async with User(system, "bob") as bob:
        assert (await bob.http.get(f"/api/ai-agent/job/{job_id}/status")).status_code == 404
        assert (await bob.http.get(f"/api/canvas/{canvas_id}/objects")).status_code == 404


async def test_rejected_api_key_fails_the_job_with_a_clear_message(system: System) -> None:
    async with User(system, "carol") as carol, carol.socket() as socket:
        job_id, canvas_id = await carol.submit("a mind map [[fake:status=401]]")
        frames = await socket.until_final(job_id)
        error = frames[-1]
        assert error["type"] == "ai_job_error"
        assert error["data"]["final"] is True
        assert error["data"]["retryable"] is False

        status = await carol.status(job_id)
        assert status["status"] == "failed"
        assert "401" in status["error_message"] or "key" in status["error_message"].lower()
        assert OPENAI_KEY not in status["error_message"]
        assert await carol.objects(canvas_id) == []


async def test_requests_without_a_valid_token_get_401(system: System) -> None:
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=10) as http:
        missing = await http.post("/api/ai-agent/create-canvas", json={"query": "x"})
        assert missing.status_code == 401
        assert missing.json()["detail"]
        forged = await http.post(
            "/api/ai-agent/create-canvas",
            json={"query": "x"},
            headers={"Authorization": "Bearer not.a.jwt"},
        )
        assert forged.status_code == 401
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        async with websockets.connect(system.websocket_url("not.a.jwt")) as ws:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "x" * 5000}, "query"),
        ({"query": "ok", "colour": "red"}, "colour"),
        ({"query": "ok", "priority": 10}, "priority"),
    ],
)
async def test_bad_bodies_get_422_naming_the_field(
    system: System, body: dict[str, Any], field: str
) -> None:
    async with User(system, "dave") as dave:
        answer = await dave.http.post("/api/ai-agent/create-canvas", json=body)
    assert answer.status_code == 422
    assert field in json.dumps(answer.json()["detail"])


async def test_a_job_can_be_followed_across_all_four_services_by_one_query(system: System) -> None:
    correlation = f"follow-{uuid.uuid4().hex[:8]}"
    async with User(system, "erin") as erin, erin.socket() as socket:
        accepted = await erin.http.post(
            "/api/ai-agent/create-canvas",
            json={"query": "three boxes in a row"},
            headers={"X-Request-ID": correlation},
        )
        job_id = accepted.json()["job_id"]
        await socket.until_final(job_id)

    async def lines_for_job() -> dict[str, list[dict[str, Any]]]:
        return {
            name: [line for line in proc.log_lines() if line.get("job_id") == job_id]
            for name, proc in system.processes.items()
            if name != "fake-openai"
        }

    # The notifier logs its push after sending; give the last line a moment to land.
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        by_service = await lines_for_job()
        if all(by_service.values()) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    for name, lines in by_service.items():
        assert lines, f"{name} logged nothing for job {job_id}"
        for line in lines:
            assert line["correlation_id"] == correlation, (name, line)
            assert {"timestamp", "level", "service", "event"} <= set(line), (name, line)
    for proc in system.processes.values():
        for line in proc.log_lines():  # every line of every service parses as JSON
            text = json.dumps(line)
            assert OPENAI_KEY not in text and JWT_SECRET not in text
