"""A cancel answered 202 right after the job's own 202 wins with two orchestrators.

The gateway accepts a cancel as soon as its ledger knows the job, and publishes it
behind the JobRequested; with two orchestrator replicas, the cancel may be consumed
(and committed) by one of them before the other has recorded the job. The cancel of a
job not recorded yet is kept until its JobRequested is, which then records the job
cancelled at once: no attempt is dispatched, and the model is never called for it.

A job whose cancel landed after its attempt was dispatched is cancelled the usual way:
a generator that took the attempt aborts its call (the stand-in counts the call as
abandoned), and the orchestrator ignores whatever the attempt still sends.
"""

from __future__ import annotations

import asyncio

from tests.faults.conftest import MakeSystem
from tests.faults.harness import (
    Client,
    Submitted,
    calls_of,
    figures,
    log_problems,
    query,
)

JOBS = 20


async def test_cancel_right_after_submit_wins_whichever_orchestrator_consumes_it(
    make_system: MakeSystem,
) -> None:
    system = await make_system(
        replicas=[("orchestrator", "orchestrator-2")], MAX_CONCURRENT_JOBS=JOBS
    )
    texts = [query(i, delay_ms=3000) for i in range(JOBS)]
    async with Client(system) as client:

        async def submit_and_cancel(text: str) -> tuple[Submitted, int]:
            job = await client.submit(text)
            return job, (await client.cancel(job.job_id)).status_code

        answers = await asyncio.gather(*(submit_and_cancel(text) for text in texts))
        submitted = [job for job, _ in answers]
        outcome = await client.outcome(submitted, timeout=30)
        calls = system.stand_in.calls()
        stats = system.stand_in.stats()

    codes = [code for _, code in answers]
    # Jobs cancelled before any attempt was dispatched: their stream has none.
    never_dispatched = [
        text
        for (job, _), text in zip(answers, texts, strict=True)
        if not any(e["type"] == "GenerationRequested" for e in outcome.events.get(job.job_id, []))
    ]
    figures(
        "cancel-race",
        outcome,
        faults=0,
        cancelled=outcome.cancelled,
        never_dispatched=len(never_dispatched),
        model_calls=sum(calls.values()),
    )
    assert codes == [202] * JOBS
    assert outcome.cancelled == JOBS, outcome.problems
    assert outcome.problems == []
    assert [calls_of(calls, text) for text in never_dispatched] == [0] * len(never_dispatched)
    # A dispatched attempt reaches the model at most once, and that call is aborted.
    assert all(calls_of(calls, text) <= 1 for text in texts), calls
    assert stats["abandoned"] == stats["calls"], stats
    assert log_problems(system) == []
