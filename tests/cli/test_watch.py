"""Following one job: the gateway's record first, then the notifier, with reconnects
and polling; against an in-process WebSocket server and httpx's in-memory transport
(the real processes are in test_commands.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve

from canvas_cli import watch
from canvas_cli.api import Gateway
from canvas_cli.errors import CliError
from canvas_cli.view import JobView
from canvas_cli.watch import Follower
from tests.support.processes import free_port

JOB = "3f1c9a52-8d7e-4b1a-9c33-2f5d6e7a8b90"
TOKEN = "header.payload.signature"
DEADLINE = 20.0


def frame(kind: str, position: int, **data: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "job_id": JOB,
        "canvas_id": "board",
        "position": position,
        "occurred_at": "2025-01-01T12:00:00+00:00",
        "data": data,
    }


def event(kind: str, position: int, **data: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "version": position,
        "position": position,
        "occurred_at": "2025-01-01T12:00:00+00:00",
        "data": data,
    }


class Recorder:
    """A sink that keeps what it was shown."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.connections: list[bool] = []
        self.closed = False

    def frame(self, view: JobView, frame: dict[str, Any]) -> None:
        self.frames.append(frame)

    def connection(self, view: JobView, connected: bool, reason: str | None = None) -> None:
        self.connections.append(connected)

    def close(self, view: JobView) -> None:
        self.closed = True

    @property
    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]


class Notifier:
    """A WebSocket server that plays one scripted handler per connection, in order,
    and records what each connection asked for."""

    def __init__(self, *scripts: Callable[[ServerConnection], Awaitable[None]]) -> None:
        self.scripts = list(scripts)
        self.queries: list[dict[str, list[str]]] = []
        self.authorizations: list[str | None] = []
        self.received: list[dict[str, Any]] = []
        self.url = ""

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.queries.append(parse_qs(urlsplit(ws.request.path).query))
        self.authorizations.append(ws.request.headers.get("Authorization"))
        await self.scripts.pop(0)(ws)

    async def subscribe_message(self, ws: ServerConnection) -> None:
        message = json.loads(await ws.recv())
        self.received.append(message)
        await ws.send(json.dumps({"type": "subscribed", **message}))


@pytest.fixture
async def notifier_server() -> AsyncIterator[Callable[..., Awaitable[Notifier]]]:
    servers = []

    async def start(*scripts: Callable[[ServerConnection], Awaitable[None]]) -> Notifier:
        notifier = Notifier(*scripts)
        port = free_port()
        servers.append(await serve(notifier._handle, "127.0.0.1", port))
        notifier.url = f"ws://127.0.0.1:{port}/ws"
        return notifier

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def gateway(*answers: list[dict[str, Any]]) -> Gateway:
    """A gateway whose events endpoint gives each list in turn, then the last forever."""
    pending = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/api/ai-agent/job/{JOB}/events"
        events = pending.pop(0) if len(pending) > 1 else pending[0]
        return httpx.Response(200, json={"job_id": JOB, "events": events})

    return Gateway("http://gateway.test", TOKEN, transport=httpx.MockTransport(handler))


async def follow(gw: Gateway, url: str, sink: Recorder) -> JobView:
    async with gw, asyncio.timeout(DEADLINE):
        return await Follower(gw, url, TOKEN, JobView(JOB), sink).run()


async def test_objects_stream_in_over_the_socket_until_completion(
    notifier_server: Callable[..., Awaitable[Notifier]],
) -> None:
    async def live(ws: ServerConnection) -> None:
        await notifier.subscribe_message(ws)
        for item in (
            frame("ai_job_queued", 2, priority=5, retry_count=0),
            {**frame("ai_job_queued", 3), "job_id": "someone-elses-job"},
            frame("ai_generation_started", 4, model="m"),
            frame("ai_generation_progress", 5, index=0, object={"type": "circle"}),
            frame("ai_generation_progress", 6, index=1, object={"type": "text"}),
            frame("ai_generation_completed", 7, object_count=2),
        ):
            await ws.send(json.dumps(item))
        await ws.wait_closed()

    notifier = await notifier_server(live)
    sink = Recorder()
    view = await follow(gateway([]), notifier.url, sink)

    assert view.outcome == "completed"
    assert view.objects == {0: {"type": "circle"}, 1: {"type": "text"}}
    assert sink.types == [
        "ai_job_queued",
        "ai_generation_started",
        "ai_generation_progress",
        "ai_generation_progress",
        "ai_generation_completed",
    ]
    assert sink.closed
    assert notifier.received == [{"type": "subscribe", "job_id": JOB}]
    # No recorded event yet: the stream starts live (no after). The token goes in the
    # header, never in the URL.
    assert notifier.queries == [{}]
    assert notifier.authorizations == [f"Bearer {TOKEN}"]


async def test_recorded_events_come_first_and_the_socket_resumes_after_them(
    notifier_server: Callable[..., Awaitable[Notifier]],
) -> None:
    async def resumed(ws: ServerConnection) -> None:
        # A replay that overlaps what the gateway gave: shown once.
        await ws.send(json.dumps(frame("ai_generation_started", 12, model="m")))
        await ws.send(json.dumps(frame("ai_generation_completed", 14, object_count=1)))
        await ws.wait_closed()

    notifier = await notifier_server(resumed)
    recorded = [
        event("JobRequested", 10, canvas_id="board", query="q", priority=5),
        event("JobQueued", 11, priority=5, retry_count=0),
        event("GenerationStarted", 12, model="m", attempt_id="a", generator_id="g"),
    ]
    sink = Recorder()
    view = await follow(gateway(recorded), notifier.url, sink)

    assert view.outcome == "completed"
    assert view.canvas_id == "board"
    assert sink.types == ["ai_job_queued", "ai_generation_started", "ai_generation_completed"]
    assert notifier.queries == [{"after": ["12"]}]


async def test_a_finished_job_ends_from_its_record_without_a_socket() -> None:
    recorded = [
        event("JobRequested", 1, canvas_id="board", query="q", priority=5),
        event("JobQueued", 2, priority=5, retry_count=0),
        event("JobFailed", 3, error="bad key", retry_count=0),
    ]
    sink = Recorder()
    # Nothing listens there: a finished job never needs the notifier.
    view = await follow(gateway(recorded), f"ws://127.0.0.1:{free_port()}/ws", sink)
    assert view.outcome == "failed"
    assert view.error == "bad key"
    assert sink.connections == []


async def test_a_dropped_connection_resumes_after_the_last_position_seen(
    notifier_server: Callable[..., Awaitable[Notifier]],
) -> None:
    async def first(ws: ServerConnection) -> None:
        await ws.send(json.dumps(frame("ai_job_queued", 5, priority=5)))
        await ws.send(json.dumps(frame("ai_generation_progress", 7, index=0, object={})))
        await ws.close(1001, "going away")

    async def second(ws: ServerConnection) -> None:
        await ws.send(json.dumps(frame("ai_generation_progress", 7, index=0, object={})))
        await ws.send(json.dumps(frame("ai_generation_completed", 9, object_count=1)))
        await ws.wait_closed()

    notifier = await notifier_server(first, second)
    sink = Recorder()
    view = await follow(gateway([]), notifier.url, sink)

    assert view.outcome == "completed"
    assert sink.types == ["ai_job_queued", "ai_generation_progress", "ai_generation_completed"]
    assert notifier.queries == [{}, {"after": ["7"]}]
    assert sink.connections == [False, True]


async def test_a_refused_token_stops_the_watch_with_an_error(
    notifier_server: Callable[..., Awaitable[Notifier]],
) -> None:
    async def refuse(ws: ServerConnection) -> None:
        await ws.close(4401, "token missing, invalid or expired")

    notifier = await notifier_server(refuse)
    with pytest.raises(CliError, match="refused the token: token missing, invalid or expired"):
        await follow(gateway([]), notifier.url, Recorder())


async def test_the_gateway_is_polled_while_the_notifier_cannot_be_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch, "RECONNECT_DELAYS", (0.05, 0.1))
    recorded = [event("JobQueued", 2, priority=5, retry_count=0)]
    later = [*recorded, event("JobCancelled", 3, reason="cancelled by the user")]
    sink = Recorder()
    view = await follow(
        gateway(recorded, recorded, later), f"ws://127.0.0.1:{free_port()}/ws", sink
    )
    assert view.outcome == "cancelled"
    assert sink.types == ["ai_job_queued", "ai_job_cancelled"]
    assert sink.connections == [False]  # said once, not at every retry


async def test_a_silent_socket_is_backed_by_the_gateways_record(
    notifier_server: Callable[..., Awaitable[Notifier]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "POLL_SECONDS", 0.05)

    async def silent(ws: ServerConnection) -> None:
        # Connected, but the job's frames were missed (placed at the head too late).
        await ws.wait_closed()

    notifier = await notifier_server(silent)
    done = [
        event("JobQueued", 2, priority=5, retry_count=0),
        event("JobCompleted", 5, object_count=3, object_ids=["a", "b", "c"], dropped_objects=0),
    ]
    sink = Recorder()
    view = await follow(gateway([], [], done), notifier.url, sink)
    assert view.outcome == "completed"
    assert view.object_count == 3
    assert sink.types == ["ai_job_queued", "ai_generation_completed"]
