"""kill -9 the job-orchestrator while 50 jobs are in flight, start it again: all 50
complete, and each job's objects reach its canvas exactly once.

Why it holds: the orchestrator acks a message only after the transaction that recorded
its effect committed, with the message's id in processed_messages; so what the dead
process held is redelivered, and what it had already recorded is recognised and acked
without a second effect. Events it recorded but had not published yet wait in the
event store for the relay of the restarted process (transactional outbox).
"""

from __future__ import annotations

from tests.faults.conftest import MakeSystem
from tests.faults.harness import (
    FINAL,
    Client,
    assert_completed,
    count_status,
    figures,
    lines,
    log_problems,
    query,
)

JOBS = 50


async def test_orchestrator_killed_with_50_jobs_in_flight_all_complete_exactly_once(
    make_system: MakeSystem,
) -> None:
    # 10 model calls at a time, 1 s each: about 5 s of work for the 50 jobs.
    system = await make_system(MAX_CONCURRENT_JOBS=10)
    orchestrator = system.processes["orchestrator"]
    async with Client(system) as client:
        submitted = await client.submit_many([query(i, delay_ms=1000) for i in range(JOBS)])
        # Kill it as soon as the generator is at work: it is still taking in the burst
        # of requests, the first results are on their way, no job has ended.
        at_kill = await client.wait_until(
            lambda jobs: count_status(jobs, "processing") >= 5,
            timeout=30,
            what="the first attempts to start",
        )
        orchestrator.kill()
        in_flight = sum(1 for job in at_kill.values() if job["status"] not in FINAL)
        orchestrator.start()
        await orchestrator.wait_ready()
        outcome = await client.outcome(submitted, timeout=45)

    # Messages the dead process had recorded but not acked, recognised on redelivery.
    duplicates = len(lines(orchestrator, "duplicate message ignored"))
    figures(
        "orchestrator-kill",
        outcome,
        faults=1,
        in_flight_at_kill=in_flight,
        redelivered_duplicates=duplicates,
    )
    assert in_flight >= 45
    assert_completed(outcome, JOBS)
    assert log_problems(system) == []
