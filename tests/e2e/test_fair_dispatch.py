"""Fair dispatch between users, against the real processes (issue 16, item 1): a heavy
user's burst does not make a light user's single job wait behind it.

The issue's figure, scaled to a test on a small machine: a heavy user submits 300 jobs
(a 1 s model, MAX_CONCURRENT_JOBS=20: the burst takes 15 s to drain), then a light user
submits 20 jobs one at a time, spread through the burst. Each light job must start
within 2 s of its request (p99 of the 20, by the nearest rank: the slowest). First come
first served made them wait behind the rest of the burst: 6 to 12.9 s (p99 12.9 s) on
main before fair dispatch; 0.05 to 1.6 s with it."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from tests.support.system import System
from tests.support.users import User

pytestmark = pytest.mark.e2e

HEAVY_JOBS = 300
LIGHT_JOBS = 20
CONCURRENCY = 20
SYSTEM_ENV = {
    "MAX_CONCURRENT_JOBS": str(CONCURRENCY),
    "FAKE_OPENAI_DELAY_MS": "1000",
    "MAX_ACTIVE_JOBS_PER_USER": "1000",
}
START_WITHIN_SECONDS = 2.0


def _waited(status: dict[str, object]) -> float:
    """Seconds from a job's request to its first start."""
    created = datetime.fromisoformat(str(status["created_at"]))
    started = datetime.fromisoformat(str(status["started_at"]))
    return (started - created).total_seconds()


def p99(values: list[float]) -> float:
    """The 99th percentile by the nearest rank (of 20 values: the largest)."""
    ordered = sorted(values)
    rank = max(0, -(-99 * len(ordered) // 100) - 1)
    return ordered[rank]


async def _burst(user: User, count: int) -> list[str]:
    """``count`` jobs of ``user``, ten requests at a time."""
    gate = asyncio.Semaphore(10)

    async def one(n: int) -> str:
        async with gate:
            return (await user.submit(f"a heavy drawing {n}")).job_id

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def test_a_light_users_jobs_start_within_2_s_during_a_heavy_users_burst(
    system: System,
) -> None:
    async with User(system) as heavy, User(system) as light:
        heavy_ids = await _burst(heavy, HEAVY_JOBS)
        light_ids = []
        for n in range(LIGHT_JOBS):
            light_ids.append((await light.submit(f"a light drawing {n}")).job_id)
            await asyncio.sleep(0.4)  # 8 s: spread through the burst's 15 s
        light_done = [
            await light.until_status(job_id, "completed", timeout=120) for job_id in light_ids
        ]
        # The light jobs ran while the burst was still on.
        last_heavy = await heavy.status(heavy_ids[-1])
        heavy_done = [
            await heavy.until_status(job_id, "completed", timeout=180) for job_id in heavy_ids[-5:]
        ]
    waits = [_waited(status) for status in light_done]
    print(f"light jobs' waits to start (s): {sorted(round(w, 2) for w in waits)}")
    print(f"p99 {p99(waits):.2f} s")
    assert last_heavy["status"] in ("queued", "processing")
    assert [status["status"] for status in heavy_done] == ["completed"] * 5
    assert p99(waits) <= START_WITHIN_SECONDS, sorted(waits)


def test_p99_is_the_nearest_rank() -> None:
    assert p99([float(n) for n in range(1, 21)]) == 20.0
    assert p99([float(n) for n in range(1, 101)]) == 99.0
