"""`make bench SCENARIO=fair` and `SCENARIO=budget`: how the fleet is shared (issue 16),
at the issue's own scale, on real processes.

- fair: a heavy user submits 2,000 jobs (a 1 s model, MAX_CONCURRENT_JOBS=100: the burst
  takes at least 20 s to drain), then a light user submits 20 jobs, 0.5 s apart, spread
  through the burst. Reported: each light job's wait from its request to its start
  (target: p99 within 2 s), and how long the burst took.
- budget: three generator processes, MODEL_REQUESTS_PER_MINUTE=600, a 0 ms model, 700
  jobs. Reported: the most calls the stand-in saw arrive in any 60 s window (target: at
  most 600), and whether every job completed.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.support.fake_openai import busiest_window
from tests.support.system import running_system
from tests.support.users import User


def _pct(values: list[float], q: float) -> float:
    """The q-quantile by the nearest rank."""
    ordered = sorted(values)
    rank = max(0, -(-int(q * 100) * len(ordered) // 100) - 1)
    return round(ordered[rank], 2)


def _waited(status: dict[str, Any]) -> float:
    created = datetime.fromisoformat(str(status["created_at"]))
    started = datetime.fromisoformat(str(status["started_at"]))
    return (started - created).total_seconds()


async def _burst(user: User, count: int, prompt: str, at_once: int = 20) -> list[str]:
    gate = asyncio.Semaphore(at_once)

    async def one(n: int) -> str:
        async with gate:
            return (await user.submit(f"{prompt} {n}")).job_id

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def _all_done(user: User, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
    return [
        await user.until_status(job_id, "completed", "failed", "cancelled", timeout=timeout)
        for job_id in job_ids
    ]


async def run_fair(log_dir: Path, heavy_jobs: int = 2000, light_jobs: int = 20) -> dict[str, Any]:
    """The fair scenario (module docstring)."""
    env = {
        "MAX_CONCURRENT_JOBS": "100",
        "FAKE_OPENAI_DELAY_MS": "1000",
        "MAX_ACTIVE_JOBS_PER_USER": str(heavy_jobs + light_jobs),
    }
    async with (
        running_system(log_dir, label="fair", extra_env=env) as system,
        User(system) as heavy,
        User(system) as light,
    ):
        began = time.perf_counter()
        heavy_ids = await _burst(heavy, heavy_jobs, "a heavy drawing")
        submitted_s = time.perf_counter() - began
        light_ids = []
        for n in range(light_jobs):
            light_ids.append((await light.submit(f"a light drawing {n}")).job_id)
            await asyncio.sleep(0.5)
        light_done = await _all_done(light, light_ids, 300)
        heavy_done = await _all_done(heavy, heavy_ids, 600)
        drained_s = time.perf_counter() - began
    waits = [_waited(status) for status in light_done if status.get("started_at")]
    failed = sum(s["status"] != "completed" for s in [*light_done, *heavy_done])
    return {
        "heavy_jobs": heavy_jobs,
        "light_jobs": light_jobs,
        "heavy_submitted_s": round(submitted_s, 1),
        "burst_drained_s": round(drained_s, 1),
        "light_wait_p50_s": _pct(waits, 0.5),
        "light_wait_p99_s": _pct(waits, 0.99),
        "light_wait_max_s": round(max(waits), 2),
        "not_completed": failed,
    }


async def run_budget(log_dir: Path, jobs: int = 700, per_minute: int = 600) -> dict[str, Any]:
    """The budget scenario (module docstring)."""
    env = {
        "MODEL_REQUESTS_PER_MINUTE": str(per_minute),
        "FAKE_OPENAI_DELAY_MS": "0",
        "MAX_ACTIVE_JOBS_PER_USER": str(jobs),
    }
    async with running_system(log_dir, label="budget", extra_env=env) as system:
        added = [system.add_replica("generator", f"generator-{n}") for n in (2, 3)]
        for process in added:
            process.start()
        await asyncio.gather(*(process.wait_ready() for process in added))
        async with User(system) as user:
            began = time.perf_counter()
            job_ids = await _burst(user, jobs, "a budget drawing")
            done = await _all_done(user, job_ids, 600)
            took_s = time.perf_counter() - began
        arrivals = await asyncio.to_thread(system.stand_in.arrivals)
    return {
        "jobs": jobs,
        "generators": 3,
        "requests_per_minute": per_minute,
        "calls": len(arrivals),
        "busiest_60s_window": busiest_window(arrivals, 60.0),
        "took_s": round(took_s, 1),
        "not_completed": sum(status["status"] != "completed" for status in done),
    }


def print_sharing(fair: dict[str, Any] | None, budget: dict[str, Any] | None) -> None:
    """The two scenarios' figures, one line each."""
    if fair is not None:
        print(
            f"fair: {fair['heavy_jobs']} heavy jobs (submitted in {fair['heavy_submitted_s']} s, "
            f"drained in {fair['burst_drained_s']} s); {fair['light_jobs']} light jobs waited "
            f"p50 {fair['light_wait_p50_s']} s, p99 {fair['light_wait_p99_s']} s, max "
            f"{fair['light_wait_max_s']} s to start (target p99 <= 2 s); "
            f"{fair['not_completed']} not completed"
        )
    if budget is not None:
        print(
            f"budget: {budget['jobs']} jobs on {budget['generators']} generators at "
            f"{budget['requests_per_minute']}/min: {budget['calls']} calls, at most "
            f"{budget['busiest_60s_window']} in any 60 s window (target <= "
            f"{budget['requests_per_minute']}), {budget['took_s']} s, "
            f"{budget['not_completed']} not completed"
        )
