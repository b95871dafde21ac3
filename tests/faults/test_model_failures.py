"""The model fails 30% of calls with 500, 429 and timeouts: every job still completes,
and each retry is in the job's history.

Settings, and why:

- ``FAKE_OPENAI_FAILURE_RATE=0.3``, ``FAKE_OPENAI_FAILURE_MODES=500,429,timeout``: the
  stand-in draws a failure for about one call in three, and which one at random.
- ``OPENAI_TIMEOUT_SECONDS=1.5``: a "timeout" call never answers, so each costs this
  long before the client gives up; short keeps the test short. The lease
  (``GENERATION_LEASE_SECONDS``) must exceed it, and 10 s is far more than any call here.
- ``MAX_JOB_RETRIES=12``: a job fails only if 13 calls in a row fail, 0.3^13 = 1.6e-7
  per job, so "every job completes" is not luck.
- ``RETRY_BACKOFF_UNIT_SECONDS=0.05``: the backoff (0.05 s x 2^retries) stays well below
  a second for the few retries a job needs; a 429's Retry-After (1 s from the stand-in)
  is longer and is honoured instead.
"""

from __future__ import annotations

from collections import Counter

from tests.faults.conftest import MakeSystem
from tests.faults.harness import Client, assert_completed, figures, log_problems, query

JOBS = 30
TRANSIENT_KINDS = {"server_error", "rate_limited", "timeout"}


async def test_model_failing_30_percent_of_calls_every_job_completes_with_its_retries_recorded(
    make_system: MakeSystem,
) -> None:
    system = await make_system(
        FAKE_OPENAI_FAILURE_RATE=0.3,
        FAKE_OPENAI_FAILURE_MODES="500,429,timeout",
        OPENAI_TIMEOUT_SECONDS=1.5,
        GENERATION_LEASE_SECONDS=10,
        MAX_JOB_RETRIES=12,
        RETRY_BACKOFF_UNIT_SECONDS=0.05,
        MAX_CONCURRENT_JOBS=10,
    )
    async with Client(system) as client:
        submitted = await client.submit_many([query(i) for i in range(JOBS)])
        outcome = await client.outcome(submitted, timeout=50)
    stats = system.stand_in.stats()

    kinds: Counter[str] = Counter()
    retried_jobs = 0
    for job in submitted:
        events = outcome.events.get(job.job_id, [])
        types = [event["type"] for event in events]
        failures = [event["data"] for event in events if event["type"] == "GenerationFailed"]
        kinds.update(failure["kind"] for failure in failures)
        retries = types.count("JobRetryScheduled")
        # Every failed attempt of a job that completed was followed by a retry, and the
        # status says how many.
        assert retries == len(failures), (job.job_id, types)
        assert outcome.statuses[job.job_id]["retry_count"] == retries
        retried_jobs += retries > 0
    failed_calls = sum(stats["failures"].values())
    figures(
        "model-failures",
        outcome,
        faults=failed_calls,
        retried_jobs=retried_jobs,
        calls=stats["calls"],
        failures_by_mode=",".join(f"{k}:{v}" for k, v in sorted(stats["failures"].items())),
    )
    assert_completed(outcome, JOBS)
    assert outcome.retries > 0 and retried_jobs > 0
    assert set(kinds) <= TRANSIENT_KINDS, kinds
    # One recorded failure per failed call: none went unrecorded, none was retried silently.
    assert outcome.retries == failed_calls
    assert log_problems(system) == []
