"""The database refuses writes for a while, as it does after a failover (the old primary
read-only, every session dropped): an outage, not a verdict on any message.

While a user submits a job every 0.1 s, the test's database is made read-only
(``default_transaction_read_only`` for new sessions, every session terminated) for
ten seconds, then writable again (and the read-only sessions terminated once more, as
a switch to the new primary does). What must hold:

- the gateway answers 202 or 503 with ``Retry-After``, never 500, and queues nothing it
  could not record: afterwards the user's job list holds exactly the jobs answered 202;
- no message is dead-lettered: consumers wait and retry while the database refuses;
- every job answered 202 completes, with its objects on its canvas once.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from tests.faults.conftest import MakeSystem
from tests.faults.harness import (
    Client,
    Submitted,
    assert_completed,
    dead_letters,
    figures,
    lines,
    log_problems,
    query,
    set_read_only,
)

OUTAGE_SECONDS = 10.0


async def test_a_database_that_refuses_writes_delays_jobs_and_loses_none(
    make_system: MakeSystem,
) -> None:
    system = await make_system(MAX_CONCURRENT_JOBS=10)
    accepted: list[Submitted] = []
    refused: list[int] = []
    wrong: list[str] = []
    async with Client(system) as client:

        async def submit_steadily(stop: asyncio.Event) -> None:
            index = 0
            while not stop.is_set():
                with contextlib.suppress(httpx.TransportError):
                    answer = await client.post(query(index, delay_ms=200))
                    if answer.status_code == 202:
                        accepted.append(Submitted.of(answer))
                    elif answer.status_code == 503 and answer.headers.get("Retry-After"):
                        refused.append(index)
                    else:
                        wrong.append(f"{answer.status_code}: {answer.text[:200]}")
                index += 1
                await asyncio.sleep(0.1)

        stop = asyncio.Event()
        submitting = asyncio.create_task(submit_steadily(stop))
        try:
            await asyncio.sleep(1.5)  # jobs in every stage when the database turns
            await set_read_only(system.database_url, True)
            await asyncio.sleep(OUTAGE_SECONDS)
            await set_read_only(system.database_url, False)
            await asyncio.sleep(2)
        finally:
            stop.set()
            await submitting
        outcome = await client.outcome(accepted, timeout=60)
        listed = await client.statuses()

    dead = await dead_letters(system)
    dead_lettered = [
        line
        for process in system.processes.values()
        for line in lines(process, "message dead-lettered")
    ]
    figures(
        "database-read-only",
        outcome,
        faults=1,
        answered_503=len(refused),
        wrong_answers=len(wrong),
        dead_lettered=sum(dead.values()),
    )
    assert wrong == [], wrong[:5]
    assert refused, "the gateway never noticed the database refusing writes"
    assert dead_lettered == [] and sum(dead.values()) == 0, dead
    assert_completed(outcome, len(accepted))
    # Nothing queued that could not be recorded: the list holds the 202s, and only them.
    assert listed is not None
    assert set(listed) == {job.job_id for job in accepted}
    assert log_problems(system) == []
