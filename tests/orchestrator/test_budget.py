"""The fleet's model budget in PostgreSQL (canvas_store.budget): permits in a sliding
window of calls and tokens, pauses, and replicas that race for the last permit."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import asyncpg

from canvas_store.budget import FRESH, Budget, Permit, acquire, pause, settle

MODEL = "model-a"


async def _ask(
    pool: asyncpg.Pool,
    budget: Budget,
    *,
    tokens: int = 10,
    model: str = MODEL,
    run: tuple[UUID, UUID] | None = None,
) -> Permit:
    attempt_id, run_id = run or (uuid4(), uuid4())
    async with pool.acquire() as conn, conn.transaction():
        return await acquire(
            conn, model, budget, attempt_id=attempt_id, run_id=run_id, estimated_tokens=tokens
        )


async def test_no_more_calls_than_the_limit_in_a_window_then_more_as_it_slides(pool) -> None:
    budget = Budget(requests=3, window_seconds=1.0)
    granted = [await _ask(pool, budget) for _ in range(3)]
    assert all(permit.granted for permit in granted)

    refused = await _ask(pool, budget)
    assert not refused.granted
    assert refused.reason == "requests"
    # The window counts a little longer than its setting: calls in transit.
    assert 1.0 < refused.retry_in_seconds <= budget.window.total_seconds()
    # Another model has a window of its own.
    assert (await _ask(pool, budget, model="model-b")).granted

    # Once the oldest call has left the window, one more fits.
    await asyncio.sleep(refused.retry_in_seconds + 0.05)
    assert (await _ask(pool, budget)).granted


async def test_asking_again_for_the_same_run_counts_one_call_when_it_is_sent(pool) -> None:
    budget = Budget(requests=1, window_seconds=60)
    run = (uuid4(), uuid4())
    assert (await _ask(pool, budget, run=run)).granted
    assert (await _ask(pool, budget, run=run)).granted  # the same permit
    assert not (await _ask(pool, budget)).granted  # the window holds one call
    async with pool.acquire() as conn:
        first = await conn.fetchval("SELECT granted_at FROM model_permits")

    # Asked again later (as the call goes out): moved to now, still one call.
    await asyncio.sleep(FRESH.total_seconds() + 0.05)
    assert (await _ask(pool, budget, run=run)).granted
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT granted_at FROM model_permits")
    assert len(rows) == 1 and rows[0]["granted_at"] > first


async def test_a_permit_asked_for_again_waits_when_others_filled_the_window(pool) -> None:
    budget = Budget(requests=2, window_seconds=60)
    run = (uuid4(), uuid4())
    assert (await _ask(pool, budget, run=run)).granted
    await asyncio.sleep(FRESH.total_seconds() + 0.05)
    assert (await _ask(pool, budget)).granted
    # Moving the first permit to now would put it beside the second: room for both.
    assert (await _ask(pool, budget, run=run)).granted
    assert not (await _ask(pool, budget)).granted


async def test_tokens_count_the_estimate_until_the_call_reports_its_usage(pool) -> None:
    budget = Budget(tokens=1_000, window_seconds=60)
    first = (uuid4(), uuid4())
    assert (await _ask(pool, budget, tokens=600, run=first)).granted
    refused = await _ask(pool, budget, tokens=600)
    assert (refused.granted, refused.reason) == (False, "tokens")
    assert 60 < refused.retry_in_seconds <= budget.window.total_seconds()

    # The call used less than its estimate: the room is there now.
    assert await settle(pool, attempt_id=first[0], run_id=first[1], tokens=150)
    assert (await _ask(pool, budget, tokens=600)).granted
    assert not await settle(pool, attempt_id=uuid4(), run_id=uuid4(), tokens=1)


async def test_a_call_larger_than_the_whole_budget_goes_alone(pool) -> None:
    budget = Budget(tokens=100, window_seconds=0.5)
    assert (await _ask(pool, budget, tokens=5_000)).granted
    refused = await _ask(pool, budget, tokens=5_000)
    assert not refused.granted
    await asyncio.sleep(refused.retry_in_seconds + 0.05)
    assert (await _ask(pool, budget, tokens=5_000)).granted


async def test_a_pause_holds_every_permit_of_the_model_until_it_ends(pool) -> None:
    budget = Budget(requests=100, window_seconds=60)
    until = await pause(pool, MODEL, 0.5)
    refused = await _ask(pool, budget)
    assert (refused.granted, refused.reason, refused.until) == (False, "paused", until)
    assert 0 < refused.retry_in_seconds <= 0.5
    # A shorter pause asked meanwhile does not cut the longer one short.
    assert await pause(pool, MODEL, 0.01) == until
    assert (await _ask(pool, budget, model="model-b")).granted

    # Then a slow start: one call in the pause's first second, one more in the next.
    await asyncio.sleep(refused.retry_in_seconds + 0.05)
    assert (await _ask(pool, budget)).granted
    slow = await _ask(pool, budget)
    assert (slow.granted, slow.reason) == (False, "recovering")
    assert 0 < slow.retry_in_seconds <= 1
    await asyncio.sleep(slow.retry_in_seconds + 0.05)
    assert (await _ask(pool, budget)).granted


async def test_replicas_racing_for_the_last_permits_never_take_more(pool) -> None:
    budget = Budget(requests=5, window_seconds=60)
    answers = await asyncio.gather(*(_ask(pool, budget) for _ in range(40)))
    assert sum(permit.granted for permit in answers) == 5
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM model_permits") == 5


async def test_a_refused_attempt_is_noted_waiting_until_it_gets_its_permit(pool) -> None:
    budget = Budget(requests=1, window_seconds=60)
    assert (await _ask(pool, budget)).granted
    waiting = (uuid4(), uuid4())
    assert not (await _ask(pool, budget, run=waiting)).granted
    async with pool.acquire() as conn:
        noted = await conn.fetch("SELECT attempt_id, reason FROM model_waits")
    assert [(row["attempt_id"], row["reason"]) for row in noted] == [(waiting[0], "requests")]

    # Room at last (a larger budget here): granted, and no longer waiting.
    assert (await _ask(pool, Budget(requests=10, window_seconds=60), run=waiting)).granted
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM model_waits") == 0
