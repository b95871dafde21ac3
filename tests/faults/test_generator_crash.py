"""kill -9 the ai-generator while model calls are in flight, start it again: every job
completes, and each one's objects reach its canvas exactly once.

Why it holds: a generator acks a work message only after it published the attempt's
result, so the broker hands the attempts the dead process held to the next generator
(here the restarted one), which runs them again under the same attempt id; the
orchestrator records one result per attempt.
"""

from __future__ import annotations

from datetime import UTC, datetime

from tests.faults.conftest import MakeSystem
from tests.faults.harness import (
    Client,
    assert_completed,
    attempt_runs,
    count_status,
    figures,
    log_problems,
    overlapping_runs,
    query,
    wait_in_flight,
)

JOBS = 16
KILLS = 2


async def test_generator_killed_mid_attempts_and_restarted_every_job_completes(
    make_system: MakeSystem,
) -> None:
    # 4 calls at a time, 1 s each: about 4 s of work, so both kills land mid-run.
    system = await make_system(MAX_CONCURRENT_JOBS=4)
    generator = system.processes["generator"]
    killed_at: list[datetime] = []
    in_flight_at_kill = 0
    async with Client(system) as client:
        submitted = await client.submit_many([query(i, delay_ms=1000) for i in range(JOBS)])
        for round_ in range(KILLS):
            # Some jobs done (the generator has been working) and calls in flight now.
            done = 3 * (round_ + 1)
            await client.wait_until(
                lambda jobs: count_status(jobs) >= done,  # noqa: B023 (called at once)
                timeout=30,
                what=f"{done} jobs to complete",
            )
            in_flight_at_kill += await wait_in_flight(system, at_least=2)
            generator.kill()
            killed_at.append(datetime.now(UTC))
            generator.start()
            await generator.wait_ready()
        outcome = await client.outcome(submitted, timeout=45)

    runs = attempt_runs([generator], {generator.name: killed_at})
    reruns = sum(len(items) - 1 for items in runs.values() if len(items) > 1)
    figures(
        "generator-kill",
        outcome,
        faults=KILLS,
        in_flight_at_kill=in_flight_at_kill,
        reruns=reruns,
    )
    assert_completed(outcome, JOBS)
    assert in_flight_at_kill >= KILLS * 2
    # The attempts the dead process held were run again, never two at once.
    assert reruns >= 1
    assert overlapping_runs(runs) == []
    assert log_problems(system) == []
