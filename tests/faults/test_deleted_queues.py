"""An operator deletes every queue of the system (the management UI allows it, exclusive
queues included): the services declare them again and work goes on.

A consumer whose queue is deleted is cancelled by the broker; the service reconnects
and declares its topology afresh. A message published while a queue is gone is
returned by the broker (every publish that must reach a queue is ``mandatory``): the
gateway answers 503 rather than 202, the relay and the generators publish again, and a
returned publish makes the publisher declare the topology again at once. What must
hold: every submission answers 202 or 503, every 202 completes, and a job submitted
after the deletion completes within 30 s of it.

Messages that were in a queue when it was deleted are gone with it (that is what
deleting a queue does); their jobs come back by the timers: a JobRequested by the
gateway's ledger sweep, an attempt that waited for a generator by its start deadline
(GENERATION_START_TIMEOUT_SECONDS, short here), a result by its lease.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from canvas_events.topology import Topology
from tests.faults.conftest import MakeSystem
from tests.faults.harness import (
    Client,
    Submitted,
    Watcher,
    assert_completed,
    check_outcome,
    eventually,
    figures,
    log_problems,
    query,
)
from tests.support.servers import PrivateRabbitMQ

WITHIN = 30.0


async def test_queues_deleted_by_an_operator_are_declared_again_and_new_jobs_complete(
    private_rabbitmq: PrivateRabbitMQ, make_system: MakeSystem
) -> None:
    system = await make_system(
        amqp=private_rabbitmq.url,
        GENERATION_START_TIMEOUT_SECONDS=10,
        LEDGER_RESEND_AFTER_SECONDS=5,
    )
    topology = Topology(system.prefix)
    async with Client(system) as client, Watcher(system) as watcher:
        before = await client.submit_many([query(0)])
        await client.wait_final(before, timeout=30)

        deleted = await asyncio.to_thread(private_rabbitmq.delete_queues)
        at = time.monotonic()
        deleted_at = datetime.now(UTC)
        accepted: list[Submitted] = []
        answers: list[int] = []
        for index in range(1, 11):
            answer = await client.post(query(index))
            answers.append(answer.status_code)
            if answer.status_code == 202:
                accepted.append(Submitted.of(answer))
            await asyncio.sleep(0.5)
        statuses = await client.wait_final(accepted, timeout=60)
        done_at = time.monotonic()
        outcome = await check_outcome(client, accepted, statuses)
        await watcher.wait_completed({job.job_id for job in accepted}, timeout=20)

        # The dead-letter queues have no consumer to notice: each service declares its
        # topology again every 10 s.
        async def all_declared() -> dict[str, tuple[int, int]] | None:
            queues = await asyncio.to_thread(private_rabbitmq.queues)
            return queues if set(topology.dead_letter_queues) <= set(queues) else None

        queues = await eventually(all_declared, timeout=15, what="every queue declared again")

    first_completed = min(
        (
            datetime.fromisoformat(statuses[job.job_id]["completed_at"])
            for job in accepted
            if statuses.get(job.job_id, {}).get("completed_at")
        ),
        default=None,
    )
    first_completed_s = (
        (first_completed - deleted_at).total_seconds() if first_completed else float("inf")
    )
    figures(
        "deleted-queues",
        outcome,
        faults=len(deleted),
        answered_503=answers.count(503),
        first_completed_s=round(first_completed_s, 1),
        all_completed_s=round(done_at - at, 1),
    )
    assert set(answers) <= {202, 503}, answers
    assert accepted, answers
    assert_completed(outcome, len(accepted))
    assert first_completed_s < WITHIN
    # Declared again, each with its consumers: the work queue and the orchestrator's.
    for spec in topology.durable_queues:
        assert queues.get(spec.name, (0, 0))[1] >= 1, (spec.name, queues)
    assert watcher.problems() == []
    assert log_problems(system) == []
