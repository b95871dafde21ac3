"""One model budget for the whole fleet, against the real processes: three generators
share MODEL_REQUESTS_PER_MINUTE (in a window of 2 s here, so that the test is short: the
setting is per minute; the orchestrator counts it a second longer, for the calls
in transit), and a 429 with Retry-After pauses all of them without costing
any job a retry. What counts is what the stand-in model saw arrive."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.support.fake_openai import busiest_window
from tests.support.system import System
from tests.support.users import User
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

LIMIT = 10
WINDOW_SECONDS = 4.0
SYSTEM_ENV = {
    "MODEL_REQUESTS_PER_MINUTE": str(LIMIT),
    "MODEL_BUDGET_WINDOW_SECONDS": str(WINDOW_SECONDS),
    # A counted retry would show, and would wait long.
    "MAX_JOB_RETRIES": "3",
    "RETRY_BACKOFF_UNIT_SECONDS": "30",
    "MAX_ACTIVE_JOBS_PER_USER": "100",
}
DEADLINE_SECONDS = 60.0


@pytest.fixture(scope="module")
async def fleet(system: System) -> System:
    """The system with three generator processes (stopped with it)."""
    added = [system.add_replica("generator", f"generator-{n}") for n in (2, 3)]
    for process in added:
        process.start()
    await asyncio.gather(*(process.wait_ready() for process in added))
    return system


async def test_three_generators_together_keep_to_the_fleets_request_budget(
    fleet: System,
) -> None:
    jobs = 2 * LIMIT + 2
    async with User(fleet) as user:
        before = len(await asyncio.to_thread(fleet.stand_in.arrivals))
        submitted = [await user.submit(f"a budget drawing {n}") for n in range(jobs)]

        # The last one waits for the window to pass, and its status says why.
        async def says_why() -> bool:
            status = await user.status(submitted[-1].job_id)
            return bool(status["waiting_for"] == "model capacity")

        await eventually(says_why, timeout=DEADLINE_SECONDS, what="waiting for model capacity")
        done = [
            await user.until_status(job.job_id, "completed", "failed", timeout=DEADLINE_SECONDS)
            for job in submitted
        ]
    assert [job["status"] for job in done] == ["completed"] * jobs
    arrivals = (await asyncio.to_thread(fleet.stand_in.arrivals))[before:]
    assert len(arrivals) == jobs
    assert busiest_window(arrivals, WINDOW_SECONDS) <= LIMIT
    # The budget set the pace: the third window's calls waited for two windows to pass.
    assert arrivals[-1] - arrivals[0] >= 2 * WINDOW_SECONDS


async def test_a_429_pauses_the_whole_fleet_and_costs_no_job_a_retry(fleet: System) -> None:
    stand_in = fleet.stand_in
    failing_seconds, retry_after = 4.0, 2.0
    async with User(fleet) as user:
        before = len(await asyncio.to_thread(fleet.stand_in.arrivals))
        await asyncio.to_thread(
            stand_in.configure,
            failure_rate=1.0,
            failure_modes="429",
            failure_retry_after=retry_after,
        )
        began = asyncio.get_running_loop().time()
        submitted = []
        try:
            # A steady trickle of work while the model refuses everything.
            while asyncio.get_running_loop().time() - began < failing_seconds:
                submitted.append(await user.submit(f"a paused drawing {uuid.uuid4().hex[:6]}"))
                await asyncio.sleep(0.2)
        finally:
            await asyncio.to_thread(stand_in.configure, failure_rate=0.0)
        refused = (await asyncio.to_thread(fleet.stand_in.arrivals))[before:]
        done = [
            await user.until_status(job.job_id, "completed", "failed", timeout=DEADLINE_SECONDS)
            for job in submitted
        ]
    assert len(submitted) >= 15
    # The first 429 paused everyone for its Retry-After; then one probe at a time.
    assert len(refused) <= 6, refused
    assert [job["status"] for job in done] == ["completed"] * len(submitted)
    assert [job["retry_count"] for job in done] == [0] * len(submitted)
