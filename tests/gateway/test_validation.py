"""Requests the gateway refuses before touching the database or the broker: bad tokens,
bad bodies, bad headers. The app runs in-process without its lifespan (nothing
connects), so anything that got past validation would answer 503."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import jwt
import pytest

from canvas_events.auth import mint_token
from canvas_gateway.api import create_app
from canvas_gateway.routes.jobs import decode_cursor, encode_cursor, job_id_for
from canvas_gateway.schemas import MAX_OPTIONS_BYTES
from canvas_gateway.service import Service
from canvas_gateway.settings import Settings
from tests.gateway.conftest import JWT_SECRET, token

CREATE = "/api/ai-agent/create-canvas"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(jwt_secret=JWT_SECRET, database_url="postgresql://nobody@127.0.0.1:1/x")
    app = create_app(Service(settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


def _problems(response: httpx.Response) -> dict[str, str]:
    """{"body.query": "message", ...} of a 422."""
    assert response.status_code == 422, response.text
    return {".".join(map(str, item["loc"])): item["msg"] for item in response.json()["detail"]}


async def test_missing_token_answers_401_with_www_authenticate(client: httpx.AsyncClient) -> None:
    response = await client.post(CREATE, json={"query": "a house"})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "missing bearer token" in response.json()["detail"]


async def test_expired_token_answers_401_saying_expired(client: httpx.AsyncClient) -> None:
    expired = mint_token("alice", JWT_SECRET, ttl=timedelta(seconds=-60))
    response = await client.get(
        "/api/ai-agent/jobs", headers={"Authorization": f"Bearer {expired}"}
    )
    assert response.status_code == 401
    assert response.json() == {"detail": "token expired"}
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_token_signed_with_another_secret_answers_401(client: httpx.AsyncClient) -> None:
    forged = mint_token("alice", "some-other-secret-that-is-long-enough-0123456789")
    response = await client.get("/api/ai-agent/jobs", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert "Signature verification failed" in response.json()["detail"]


async def test_token_without_exp_or_with_other_scheme_answers_401(
    client: httpx.AsyncClient,
) -> None:
    no_exp = jwt.encode({"sub": "alice"}, JWT_SECRET, algorithm="HS256")
    response = await client.get("/api/ai-agent/jobs", headers={"Authorization": f"Bearer {no_exp}"})
    assert response.status_code == 401
    assert "exp" in response.json()["detail"]
    basic = await client.get("/api/ai-agent/jobs", headers={"Authorization": "Basic YTpi"})
    assert basic.status_code == 401


@pytest.mark.parametrize(
    ("body", "where", "says"),
    [
        ({"query": ""}, "body.query", "at least 1 character"),
        ({"query": "   \n\t "}, "body.query", "at least 1 character"),
        ({"query": "x" * 2001}, "body.query", "at most 2000 characters"),
        ({}, "body.query", "Field required"),
        ({"query": "a house", "colour": "red"}, "body.colour", "Extra inputs are not permitted"),
        ({"query": "a house", "priority": 10}, "body.priority", "less than or equal to 9"),
        ({"query": "a house", "priority": -1}, "body.priority", "greater than or equal to 0"),
        ({"query": "a house", "priority": "high"}, "body.priority", "valid integer"),
        ({"query": "a house", "priority": True}, "body.priority", "valid integer"),
        ({"query": "a house", "canvas_id": "a/b"}, "body.canvas_id", "match pattern"),
        ({"query": "a house", "canvas_id": "c" * 129}, "body.canvas_id", "match pattern"),
        (
            {"query": "a house", "options": {"pad": "x" * MAX_OPTIONS_BYTES}},
            "body.options",
            f"at most {MAX_OPTIONS_BYTES} bytes",
        ),
    ],
)
async def test_bad_body_answers_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], where: str, says: str
) -> None:
    response = await client.post(CREATE, json=body, headers=token("alice"))
    problems = _problems(response)
    assert says in problems[where], problems


async def test_422_does_not_echo_the_offending_value(client: httpx.AsyncClient) -> None:
    response = await client.post(CREATE, json={"query": "secret-ish " * 300}, headers=token("a"))
    assert response.status_code == 422
    assert "secret-ish" not in response.text


async def test_body_that_is_not_json_answers_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CREATE,
        content=b"{not json",
        headers={**token("alice"), "Content-Type": "application/json"},
    )
    assert response.status_code == 422


async def test_over_long_idempotency_key_answers_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CREATE, json={"query": "a house"}, headers={**token("alice"), "Idempotency-Key": "k" * 201}
    )
    assert "header.idempotency-key" in _problems(response)


async def test_malformed_job_id_answers_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/ai-agent/job/not-a-uuid/status", headers=token("alice"))
    assert "path.job_id" in _problems(response)


async def test_bad_status_filter_or_cursor_answers_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/ai-agent/jobs?status=running", headers=token("alice"))
    assert "query.status" in _problems(response)
    response = await client.get("/api/ai-agent/jobs?cursor=bm90IGEgY3Vyc29y", headers=token("a"))
    assert _problems(response) == {"query.cursor": "not a cursor this API returned"}
    response = await client.get("/api/ai-agent/jobs?limit=0", headers=token("alice"))
    assert "query.limit" in _problems(response)


async def test_debug_environment_refuses_non_admin_with_403(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/ai-agent/debug/environment", headers=token("alice"))
    assert response.status_code == 403
    assert response.json() == {"detail": "admin role required"}


async def test_valid_request_id_is_echoed_and_a_bad_one_replaced(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/health", headers={"X-Request-ID": "req-42.a:b"})
    assert response.headers["X-Request-ID"] == "req-42.a:b"
    response = await client.get("/health", headers={"X-Request-ID": "bad id with spaces"})
    assert response.headers["X-Request-ID"] not in ("", "bad id with spaces")
    unauthorized = await client.get("/api/ai-agent/jobs", headers={"X-Request-ID": "r-1"})
    assert unauthorized.headers["X-Request-ID"] == "r-1"


async def test_database_not_connected_answers_503_with_retry_after(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(CREATE, json={"query": "a house"}, headers=token("alice"))
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.json() == {"detail": "the database is unavailable; try again later"}


async def test_openapi_documents_examples_and_errors(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    create = spec["paths"][CREATE]["post"]
    assert {"202", "401", "422", "429", "503"} <= set(create["responses"])
    assert spec["components"]["schemas"]["JobCreate"]["examples"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_idempotency_key_gives_the_same_job_id_per_user_only() -> None:
    assert job_id_for("alice", "k1") == job_id_for("alice", "k1")
    assert job_id_for("alice", "k1") != job_id_for("bob", "k1")
    assert job_id_for("alice", None) != job_id_for("alice", None)


def test_cursor_round_trips() -> None:
    at = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    job_id = UUID("12345678-1234-5678-1234-567812345678")
    assert decode_cursor(encode_cursor(at, job_id)) == (at, job_id)
