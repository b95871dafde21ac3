"""The per-user daily token budget (USER_DAILY_TOKEN_BUDGET) and GET /api/ai-agent/usage,
over real HTTP against the real PostgreSQL and RabbitMQ: jobs completed today count by
their results' usage, a user past the budget gets 429 with the reset time, an admin
does not."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from canvas_store.usage import Day, tokens_query
from tests.gateway.conftest import Gateway, token

USAGE = "/api/ai-agent/usage"


def _midnight_after(moment: datetime) -> datetime:
    return datetime.combine(moment.date() + timedelta(days=1), datetime.min.time(), UTC)


def _result(**usage: Any) -> dict[str, Any]:
    return {
        "object_count": 1,
        "object_ids": ["o1"],
        "dropped_objects": 0,
        "model": "fake-canvas-1",
        "usage": usage,
        "latency_ms": 10,
    }


async def _completed(gateway: Gateway, user: str, at: datetime, **usage: Any) -> uuid.UUID:
    return await gateway.insert_job(
        user, status="completed", completed_at=at, result=_result(**usage)
    )


async def _usage(gateway: Gateway, user: str, *, admin: bool = False) -> dict[str, Any]:
    answer = await gateway.client.get(USAGE, headers=token(user, admin=admin))
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def _alice_spent_1100_today(gateway: Gateway) -> None:
    """Alice's jobs completed today used 1,100 tokens; other jobs must not count."""
    now = datetime.now(UTC)
    today = Day.of(now).start
    await _completed(gateway, "alice", now, total_tokens=600, prompt_tokens=1, completion_tokens=1)
    # No total: prompt + completion.
    await _completed(gateway, "alice", today, prompt_tokens=300, completion_tokens=200)
    # Yesterday's, someone else's, a result without usage, unfinished or failed: none count.
    await _completed(gateway, "alice", today - timedelta(microseconds=1), total_tokens=50_000)
    await _completed(gateway, "bob", now, total_tokens=70_000)
    await _completed(gateway, "alice", now)
    await _completed(gateway, "alice", now, total_tokens="lots")
    await gateway.insert_job("alice", status="processing")
    await gateway.insert_job(
        "alice", status="failed", completed_at=now, result=_result(total_tokens=9_000)
    )


async def test_a_user_past_the_budget_gets_429_with_the_reset_time_and_an_admin_does_not(
    make_gateway: Callable[..., Any],
) -> None:
    async with make_gateway(user_daily_token_budget=1_000) as gateway:
        await _alice_spent_1100_today(gateway)
        before = datetime.now(UTC)

        refused = await gateway.create("alice")

        after = datetime.now(UTC)
        assert refused.status_code == 429, refused.text
        resets_at = _midnight_after(after)
        reset_text = resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert refused.json() == {
            "detail": f"daily token budget used (1,100 of 1,000 tokens); it resets at {reset_text}"
        }
        wait = int(refused.headers["Retry-After"])
        assert (
            math.floor((resets_at - after).total_seconds())
            <= wait
            <= math.ceil((resets_at - before).total_seconds())
        )
        assert await gateway.sql("SELECT * FROM gateway_job_requests") == []

        # An admin is exempt, though their own jobs used as much.
        admin = await gateway.client.post(
            "/api/ai-agent/create-canvas",
            json={"query": "a flowchart"},
            headers=token("alice", admin=True),
        )
        assert admin.status_code == 202, admin.text
        # Another user has their own budget.
        assert (await gateway.create("bob")).status_code == 429
        assert (await gateway.create("carol")).status_code == 202

        metrics = (await gateway.client.get("/metrics")).text
        assert 'canvas_jobs_rejected_total{reason="budget"} 2.0' in metrics


async def test_usage_reads_the_callers_tokens_today_budget_and_reset(
    make_gateway: Callable[..., Any],
) -> None:
    async with make_gateway(user_daily_token_budget=1_000) as gateway:
        await _alice_spent_1100_today(gateway)

        alice = await _usage(gateway, "alice")
        as_admin = await _usage(gateway, "alice", admin=True)
        carol = await _usage(gateway, "carol")

        resets_at = _midnight_after(datetime.now(UTC)).isoformat().replace("+00:00", "Z")
        assert alice == {"tokens_used_today": 1_100, "daily_budget": 1_000, "resets_at": resets_at}
        assert as_admin == {
            "tokens_used_today": 1_100,
            "daily_budget": None,
            "resets_at": resets_at,
        }
        assert carol == {"tokens_used_today": 0, "daily_budget": 1_000, "resets_at": resets_at}
        anonymous = await gateway.client.get(USAGE)
        assert anonymous.status_code == 401


async def test_under_the_budget_is_accepted_and_at_it_is_refused(
    make_gateway: Callable[..., Any],
) -> None:
    async with make_gateway(user_daily_token_budget=1_000) as gateway:
        now = datetime.now(UTC)
        await _completed(gateway, "alice", now, total_tokens=999)
        assert (await gateway.create("alice")).status_code == 202
        await _completed(gateway, "alice", now, total_tokens=1)

        refused = await gateway.create("alice")

        assert refused.status_code == 429
        assert "(1,000 of 1,000 tokens)" in refused.json()["detail"]


async def test_a_known_idempotency_key_is_answered_with_its_job_past_the_budget(
    make_gateway: Callable[..., Any],
) -> None:
    async with make_gateway(user_daily_token_budget=1_000) as gateway:
        first = await gateway.create("alice", headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 202
        await _completed(gateway, "alice", datetime.now(UTC), total_tokens=5_000)

        again = await gateway.create("alice", headers={"Idempotency-Key": "k-1"})
        new = await gateway.create("alice", headers={"Idempotency-Key": "k-2"})

        # The same job, no new one: the retry of a request spends nothing.
        assert again.status_code == 202
        assert again.json()["job_id"] == first.json()["job_id"]
        assert new.status_code == 429


async def test_the_budget_is_told_before_the_unfinished_jobs_limit(
    make_gateway: Callable[..., Any],
) -> None:
    async with make_gateway(user_daily_token_budget=10, max_active_jobs_per_user=1) as gateway:
        await gateway.insert_job("alice", status="queued")
        await _completed(gateway, "alice", datetime.now(UTC), total_tokens=10)

        refused = await gateway.create("alice")

        # Waiting for the unfinished job would not help: the budget is what holds.
        assert refused.status_code == 429
        assert refused.json()["detail"].startswith("daily token budget used (10 of 10 tokens)")


async def test_without_a_budget_nothing_is_refused_and_usage_says_null(
    make_gateway: Callable[..., Any],
) -> None:
    async with make_gateway() as gateway:
        await _completed(gateway, "alice", datetime.now(UTC), total_tokens=10**9)

        accepted = await gateway.create("alice")
        usage = await _usage(gateway, "alice")

        assert accepted.status_code == 202, accepted.text
        assert usage["tokens_used_today"] == 10**9
        assert usage["daily_budget"] is None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT00:00:00Z", usage["resets_at"])


@pytest.mark.parametrize(
    ("moment", "start"),
    [
        (datetime(2026, 12, 6, 23, 59, 59, 999_999, UTC), datetime(2026, 12, 6, tzinfo=UTC)),
        (datetime(2026, 12, 7, 0, 0, tzinfo=UTC), datetime(2026, 12, 7, tzinfo=UTC)),
        # 01:30 in UTC+2 is still the day before in UTC.
        (
            datetime(2026, 12, 7, 1, 30, tzinfo=timezone(timedelta(hours=2))),
            datetime(2026, 12, 6, tzinfo=UTC),
        ),
    ],
)
def test_a_day_is_a_utc_day(moment: datetime, start: datetime) -> None:
    day = Day.of(moment)
    assert (day.start, day.end) == (start, start + timedelta(days=1))


async def test_the_sum_reads_the_users_completed_jobs_through_their_index(
    gateway: Gateway,
) -> None:
    conn = await asyncpg.connect(gateway.database_url)
    try:
        # With the table this small a scan is cheaper: forbid it, so that the plan shows
        # whether the statement matches the partial index's predicate at all.
        await conn.execute("SET enable_seqscan = off")
        day = Day.of(datetime.now(UTC))
        plan = await conn.fetch(
            f"EXPLAIN {tokens_query('$1', '$2', '$3')}", "alice", day.start, day.end
        )
    finally:
        await conn.close()

    assert "jobs_user_completed" in "\n".join(row[0] for row in plan)
