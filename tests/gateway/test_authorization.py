"""Who may do what, route by route: every route of the REST API as an anonymous caller,
with an expired, a wrongly signed and an unsigned (``alg: none``) token, as another user,
and as a plain user on the admin routes. Each is denied with the right code, and no
answer carries anything of the job, the canvas or the prompt it was denied.

The WebSocket's side of the matrix is tests/notifier/test_service.py (4401 for every bad
token); the orchestrator's internal API is tests/orchestrator/test_api.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from canvas_events.topology import Topology
from tests.conftest import delete_topology
from tests.gateway.conftest import JWT_SECRET, Gateway, gateway_settings, running_gateway, token
from tests.support import tokens
from tests.support.env import create_database, database_url, drop_database
from tests.support.schema import apply_orchestrator_schema

PROMPT = "alice's secret launch plan"
CANVAS = "alices-board"


@dataclass(frozen=True)
class Route:
    """One route, and what another user (or a plain user, on an admin route) gets."""

    method: str
    path: str
    as_another_user: int
    # What Alice gets for her own (queued) job, when not a success.
    as_owner: int | None = None


ROUTES = [
    Route("POST", "/api/ai-agent/create-canvas", 404),  # on Alice's canvas
    Route("GET", "/api/ai-agent/job/{job_id}/status", 404),
    Route("GET", "/api/ai-agent/job/{job_id}/events", 404),
    Route("POST", "/api/ai-agent/job/{job_id}/cancel", 404),
    Route("POST", "/api/ai-agent/job/{job_id}/retry", 404, as_owner=409),  # not final yet
    Route("GET", "/api/ai-agent/jobs", 200),  # Bob's own (empty) list
    Route("GET", "/api/ai-agent/usage", 200),  # Bob's own tokens of the day
    Route("GET", "/api/canvas/{canvas_id}/objects", 404),
    Route("GET", "/api/ai-agent/debug/environment", 403),  # admins only
    Route("GET", "/api/admin/jobs", 403),
    Route("GET", "/api/admin/jobs/{job_id}/events", 403),
]
# Anyone may ask these.
PUBLIC = {("GET", "/api/ai-agent/health")}
BAD_TOKENS = {"anonymous": None, **tokens.bad_tokens("alice", JWT_SECRET)}


@pytest.fixture(scope="module")
async def gateway(amqp_url: str) -> AsyncIterator[Gateway]:
    """One gateway for the whole matrix (about 70 cases; a gateway, database and
    topology of each case's own cost 1 to 2 s apiece): every case makes a job of Alice's
    of its own and only reads besides, and Bob never gets to make one."""
    url = database_url(f"cj_test_{uuid.uuid4().hex[:12]}")
    topology = Topology(prefix=f"t{uuid.uuid4().hex[:10]}")
    await create_database(url)
    try:
        await apply_orchestrator_schema(url)
        # Alice's jobs stay queued (no orchestrator here): her limit must not end the run.
        settings = gateway_settings(url, amqp_url, topology, max_active_jobs_per_user=1000)
        async with running_gateway(settings, url) as running:
            yield running
    finally:
        await delete_topology(amqp_url, topology)
        await drop_database(url)


async def _alices_job(gateway: Gateway) -> str:
    created = await gateway.create("alice", query=PROMPT, canvas_id=CANVAS)
    assert created.status_code == 202, created.text
    return str(created.json()["job_id"])


async def _call(
    gateway: Gateway, route: Route, job_id: str, headers: dict[str, str]
) -> httpx.Response:
    path = route.path.format(job_id=job_id, canvas_id=CANVAS)
    body = {"query": "bob's drawing", "canvas_id": CANVAS} if route.method == "POST" else None
    return await gateway.client.request(route.method, path, json=body, headers=headers)


def _leaks(answer: httpx.Response, job_id: str) -> list[str]:
    return [secret for secret in (job_id, PROMPT, CANVAS, JWT_SECRET) if secret in answer.text]


async def test_the_matrix_covers_every_route_of_the_api(gateway: Gateway) -> None:
    spec = (await gateway.client.get("/openapi.json")).json()
    routes = {
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        if path.startswith("/api/")
        for method in operations
    }
    assert routes == {(route.method, route.path) for route in ROUTES} | PUBLIC


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: f"{route.method} {route.path}")
@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_a_caller_without_a_valid_token_gets_401_and_nothing_else(
    gateway: Gateway, route: Route, kind: str
) -> None:
    job_id = await _alices_job(gateway)
    bad = BAD_TOKENS[kind]
    headers = {"Authorization": f"Bearer {bad}"} if bad else {}

    answer = await _call(gateway, route, job_id, headers)

    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert set(answer.json()) == {"detail"}
    assert _leaks(answer, job_id) == []


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: f"{route.method} {route.path}")
async def test_another_user_is_told_nothing_of_alices_job_and_canvas(
    gateway: Gateway, route: Route
) -> None:
    job_id = await _alices_job(gateway)

    answer = await _call(gateway, route, job_id, token("bob"))

    assert answer.status_code == route.as_another_user, answer.text
    assert _leaks(answer, job_id) == []
    if answer.status_code == 404:
        # Exactly what a job or canvas that does not exist answers.
        assert answer.json()["detail"] in ("job not found", "canvas not found")
    if answer.status_code == 403:
        assert answer.json() == {"detail": "admin role required"}
    if route.path == "/api/ai-agent/jobs":
        assert answer.json()["jobs"] == []
    if route.path == "/api/ai-agent/usage":
        assert answer.json()["tokens_used_today"] == 0


async def test_alice_herself_reaches_every_route(gateway: Gateway) -> None:
    job_id = await _alices_job(gateway)
    for route in ROUTES:
        answer = await _call(gateway, route, job_id, token("alice", admin=True))
        if route.as_owner is not None:
            assert answer.status_code == route.as_owner, (route, answer.text)
        else:
            assert answer.status_code < 400, (route, answer.text)


@pytest.mark.parametrize("garbage", ["abcd.abcd.abcd", "not-a-token", "x.y"])
async def test_a_garbage_token_answers_401_saying_it_is_not_a_jwt(
    gateway: Gateway, garbage: str
) -> None:
    answer = await gateway.client.get(
        "/api/ai-agent/jobs", headers={"Authorization": f"Bearer {garbage}"}
    )
    assert answer.status_code == 401
    detail = answer.json()["detail"]
    assert detail.startswith("invalid token: not a JWT"), detail
    assert "codec" not in detail and garbage not in detail
