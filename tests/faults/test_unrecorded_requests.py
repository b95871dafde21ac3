"""The last line of defence: a job the gateway answered 202 but the orchestrator never
recorded (its JobRequested purged or dead-lettered by an operator, lost with a deleted
queue) is found in the gateway's ledger and sent again, so it runs after all.

The gateway's ledger row of every accepted request stays until the job is recorded; a
sweeper in each gateway publishes the JobRequested again for rows the orchestrator has
not recorded within LEDGER_RESEND_AFTER_SECONDS (with a backoff between tries), and the
orchestrator ignores the copies of a job it already has. After LEDGER_MAX_RESENDS tries
the request is given up: it ends failed, with a reason, and stops counting against the
user's limit (tests/gateway covers that part).
"""

from __future__ import annotations

import aio_pika

from canvas_events.broker import envelopes_of
from canvas_events.topology import Topology
from tests.faults.conftest import MakeSystem
from tests.faults.harness import Client, assert_completed, figures, lines, log_problems, query

JOBS = 3


async def test_requests_purged_before_the_orchestrator_saw_them_are_sent_again_and_run(
    make_system: MakeSystem,
) -> None:
    system = await make_system(LEDGER_RESEND_AFTER_SECONDS=1)
    orchestrator = system.processes["orchestrator"]
    async with Client(system) as client:
        orchestrator.stop()
        submitted = await client.submit_many([query(i) for i in range(JOBS)])
        # An operator's mistake: the waiting JobRequested messages are purged.
        connection = await aio_pika.connect(system.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                Topology(system.prefix).orchestrator.name, passive=True
            )
            # Taken off the queue and dropped, as a purge does; counted by request (the
            # requests of POSTs that arrived together share a message).
            purged = 0
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                purged += len(envelopes_of(message))
        orchestrator.start()
        await orchestrator.wait_ready()
        outcome = await client.outcome(submitted, timeout=30)

    resent = lines(system.processes["gateway"], "job request sent again")
    figures("unrecorded-requests", outcome, faults=1, purged=purged, resent=len(resent))
    assert purged == JOBS
    assert_completed(outcome, JOBS)
    assert {line["job_id"] for line in resent} == {job.job_id for job in submitted}
    assert log_problems(system) == []
