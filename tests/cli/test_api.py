"""The gateway client: errors in words a user can act on, pages followed, URLs built;
against httpx's in-memory transport."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from canvas_cli.api import Gateway, api_error, error_detail
from canvas_cli.config import Config, websocket_url
from canvas_cli.errors import ApiError, CliError, ExitCode, Unreachable

TOKEN = "header.payload.signature"


def test_a_string_detail_is_shown_as_is() -> None:
    assert error_detail({"detail": "job not found"}) == "job not found"
    assert error_detail(None) == "no detail given"
    assert error_detail({"detail": {"odd": 1}}) == "no detail given"


def test_validation_issues_are_shown_as_field_and_message() -> None:
    body = {
        "detail": [
            {"loc": ["body", "canvas_id"], "msg": "String should match pattern", "type": "x"},
            {"loc": ["query", "limit"], "msg": "Input should be less than 101", "type": "y"},
            {"loc": ["body"], "msg": "Field required", "type": "z"},
        ]
    }
    assert error_detail(body) == (
        "canvas_id: String should match pattern; limit: Input should be less than 101; "
        "request: Field required"
    )


@pytest.mark.parametrize(
    ("status", "detail", "retry_after", "hint_has"),
    [
        (401, "invalid token: Signature verification failed", None, "CANVAS_TOKEN"),
        (404, "job not found", None, "someone else's"),
        (409, "job is already completed", None, None),
        (429, "too many unfinished jobs (3, limit 3)", "10", "retry after 10 s"),
        (503, "the job queue is unavailable", "5", "retry after 5 s"),
    ],
)
def test_each_error_status_says_what_happened_and_what_to_do(
    status: int, detail: str, retry_after: str | None, hint_has: str | None
) -> None:
    error = api_error(status, {"detail": detail}, retry_after)
    assert error.message == f"{status}: {detail}"
    assert error.exit_code == ExitCode.ERROR
    if hint_has is None:
        assert error.hint is None
    else:
        assert error.hint is not None and hint_has in error.hint


def _gateway(handler: Any) -> Gateway:
    return Gateway("http://gateway.test", TOKEN, transport=httpx.MockTransport(handler))


def test_a_budget_429_points_at_usage_and_not_at_unfinished_jobs() -> None:
    detail = "daily token budget used (1,100 of 1,000 tokens); it resets at 2026-12-07T00:00:00Z"
    error = api_error(429, {"detail": detail}, "40000")
    assert error.message == f"429: {detail}"
    assert error.hint is not None
    assert "canvas-jobs usage" in error.hint
    assert "unfinished" not in error.hint
    assert "40000" not in error.hint  # the detail says when, better than seconds
    assert error.retry_after == "40000"


async def test_usage_asks_the_usage_route() -> None:
    seen: list[str] = []
    answer = {"tokens_used_today": 5, "daily_budget": None, "resets_at": "2026-12-07T00:00:00Z"}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        return httpx.Response(200, json=answer)

    async with _gateway(handler) as gateway:
        assert await gateway.usage() == answer
    assert seen == ["GET /api/ai-agent/usage"]


async def test_every_request_carries_the_token_in_its_header_only() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"job_id": "j", "canvas_id": "c"})

    async with _gateway(handler) as gateway:
        await gateway.submit("a box", canvas_id="c", priority=7, idempotency_key="k1")
    request = seen[0]
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Idempotency-Key"] == "k1"
    assert TOKEN not in str(request.url)
    assert json.loads(request.content) == {"query": "a box", "canvas_id": "c", "priority": 7}


async def test_an_error_answer_raises_with_the_servers_detail() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429, json={"detail": "too many unfinished jobs"}, headers={"Retry-After": "10"}
        )

    async with _gateway(handler) as gateway:
        with pytest.raises(ApiError) as caught:
            await gateway.submit("a box")
    assert caught.value.status == 429
    assert caught.value.retry_after == "10"
    assert caught.value.detail == "too many unfinished jobs"


async def test_jobs_follow_next_cursor_until_the_limit() -> None:
    pages = {
        None: {"jobs": [{"id": "1"}, {"id": "2"}], "next_cursor": "c2"},
        "c2": {"jobs": [{"id": "3"}, {"id": "4"}], "next_cursor": "c3"},
        "c3": {"jobs": [{"id": "5"}], "next_cursor": None},
    }
    asked: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        asked.append(params)
        page = pages[params.get("cursor")]
        return httpx.Response(200, json=page)

    async with _gateway(handler) as gateway:
        every = [job["id"] async for job in gateway.jobs(limit=None, page_size=2)]
        assert every == ["1", "2", "3", "4", "5"]
        asked.clear()
        three = [job["id"] async for job in gateway.jobs(limit=3, page_size=2, status="failed")]
    assert three == ["1", "2", "3"]
    # The last page asks only for what is still wanted.
    assert asked == [
        {"limit": "2", "status": "failed"},
        {"limit": "1", "status": "failed", "cursor": "c2"},
    ]


async def test_a_gateway_that_does_not_answer_is_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with _gateway(handler) as gateway:
        with pytest.raises(Unreachable) as caught:
            await gateway.status("j")
    assert "cannot reach the gateway at http://gateway.test" in caught.value.message
    assert caught.value.exit_code == ExitCode.ERROR


def test_the_websocket_url_gets_after_and_never_a_token() -> None:
    assert websocket_url("ws://n:8001/ws") == "ws://n:8001/ws"
    assert websocket_url("ws://n:8001/ws", 42) == "ws://n:8001/ws?after=42"
    assert websocket_url("wss://n/ws?token=t&after=1&x=y", 7) == "wss://n/ws?x=y&after=7"


def test_a_config_refuses_urls_of_the_wrong_kind_and_hides_its_token() -> None:
    config = Config("http://g:8000/", "ws://n:8001/ws", TOKEN)
    assert config.gateway_url == "http://g:8000"
    assert TOKEN not in repr(config)
    assert config.require_token() == TOKEN
    with pytest.raises(CliError, match="no token"):
        Config().require_token()
    with pytest.raises(CliError, match="gateway URL"):
        Config(gateway_url="localhost:8000")
    with pytest.raises(CliError, match="notifier URL"):
        Config(notifier_url="http://localhost:8001/ws")
