"""Every AMQP connection closed by the broker (an operator's "force close", a broker
that drops its clients) while model calls are in flight: one model call per attempt.

The broker hands an attempt whose connection closed to a consumer again, possibly to
the very generator still running it. A generator that gets back an attempt it is still
running adopts it: the redelivery waits for the run in hand and is acked with it, and
the run publishes what it still has to once the broker is back. A generator that gets
an attempt another process still runs starts a run of its own; the orchestrator then
counts only the newest run of the attempt (each run has an id, in every event it
sends), so progress of two runs never mixes in the job's history or on the canvas.

The broker here is a private node (tests/support/servers.py): its connections are all
this test's, and closing them disturbs nobody else.
"""

from __future__ import annotations

import asyncio
import functools

from tests.faults.conftest import MakeSystem
from tests.faults.harness import (
    Client,
    Watcher,
    assert_completed,
    calls_of,
    figures,
    log_problems,
    query,
    run_problems,
    wait_in_flight,
)
from tests.support.servers import PrivateRabbitMQ

JOBS = 4


async def test_every_connection_closed_mid_call_calls_the_model_once_per_attempt(
    private_rabbitmq: PrivateRabbitMQ, make_system: MakeSystem
) -> None:
    system = await make_system(amqp=private_rabbitmq.url, MAX_CONCURRENT_JOBS=JOBS)
    texts = [query(i, delay_ms=3000) for i in range(JOBS)]
    async with Client(system) as client, Watcher(system) as watcher:
        submitted = await client.submit_many(texts)
        await wait_in_flight(system, at_least=JOBS)
        closed = await asyncio.to_thread(private_rabbitmq.close_connections)
        outcome = await client.outcome(submitted, timeout=45)
        await watcher.wait_completed({job.job_id for job in submitted}, timeout=20)
        calls = system.stand_in.calls()

    per_job = [calls_of(calls, text) for text in texts]
    figures("connection-blip", outcome, faults=closed, model_calls=sum(per_job))
    assert closed >= 5  # every service's connections
    assert_completed(outcome, JOBS)
    assert per_job == [1] * JOBS
    assert [run_problems(events) for events in outcome.events.values()] == [[]] * JOBS
    assert watcher.problems() == []
    assert log_problems(system) == []


async def test_an_attempt_taken_over_by_another_generator_counts_only_its_newest_run(
    private_rabbitmq: PrivateRabbitMQ, make_system: MakeSystem
) -> None:
    system = await make_system(
        amqp=private_rabbitmq.url,
        MAX_CONCURRENT_JOBS=JOBS,
        replicas=[("generator", "generator-2")],
    )
    texts = [query(i, delay_ms=3000) for i in range(JOBS)]
    async with Client(system) as client:
        submitted = await client.submit_many(texts)
        await wait_in_flight(system, at_least=JOBS)
        # Only the first generator's connections: the attempts it runs go to the other.
        first = system.processes["generator"]
        closed = await asyncio.to_thread(
            functools.partial(private_rabbitmq.close_connections, of_pid=first.pid)
        )
        outcome = await client.outcome(submitted, timeout=45)

    restarted = (
        sum(
            1
            for events in outcome.events.values()
            for event in events
            if event["type"] == "GenerationStarted"
        )
        - JOBS
    )
    figures("generator-takeover", outcome, faults=closed, runs_taken_over=restarted)
    assert closed >= 1
    assert_completed(outcome, JOBS)
    assert [run_problems(events) for events in outcome.events.values()] == [[]] * JOBS
    assert log_problems(system) == []
