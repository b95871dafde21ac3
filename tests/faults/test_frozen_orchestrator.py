"""An orchestrator that freezes (SIGSTOP: a paused VM, a long GC pause) or loses the
broker gives up what it holds, and the other replica carries on.

What a frozen process holds, and what takes it back:

- the relay's session lock, on a connection whose session the database ends after
  ``idle_session_timeout`` (the relay queries every poll interval while it is alive);
- row locks of a transaction it was in, and the event store's readers, which stop below
  that transaction, ended by ``idle_in_transaction_session_timeout``;
- the messages its consumer had taken, which the broker hands to the other replica once
  the frozen connection misses its heartbeats.

A relay that reaches the database but not the broker releases its lock once it has
been unable to publish for a few seconds, and takes it again only with a broker.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import MakeSystem
from tests.faults.harness import (
    Client,
    assert_completed,
    eventually,
    log_problems,
    query,
)
from tests.support.env import amqp_url
from tests.support.processes import ServiceProcess
from tests.support.proxy import open_proxy

# A freeze is noticed by timeouts (the broker's heartbeats, the database's session
# timeouts): each case takes tens of seconds, within the test's own bound below.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

JOBS = 5
# The bound: jobs complete within two minutes of the freeze.
WITHIN = 120.0
RELAY_LINES = frozenset({"relay active", "relay released", "relay interrupted; retrying"})


def holds_relay(process: ServiceProcess) -> bool:
    """Whether the process's last word about the relay says that it holds it."""
    said = [line["event"] for line in process.log_lines() if line.get("event") in RELAY_LINES]
    return bool(said) and said[-1] == "relay active"


async def the_relay_holder(processes: list[ServiceProcess]) -> ServiceProcess:
    async def one_holder() -> ServiceProcess | None:
        holders = [process for process in processes if holds_relay(process)]
        return holders[0] if len(holders) == 1 else None

    return await eventually(one_holder, timeout=30, what="one orchestrator to hold the relay")


async def jobs_complete_after(client: Client, start: float, first: int) -> float:
    """Submit JOBS jobs and wait until every one completed; seconds since ``start``."""
    submitted = await client.submit_many([query(first + i, delay_ms=200) for i in range(JOBS)])
    outcome = await client.outcome(submitted, timeout=WITHIN)
    assert_completed(outcome, JOBS)
    return time.monotonic() - start


async def test_a_frozen_orchestrator_loses_the_relay_and_its_work_to_the_other(
    make_system: MakeSystem,
) -> None:
    system = await make_system(replicas=[("orchestrator", "orchestrator-2")])
    orchestrators = [system.processes["orchestrator"], system.processes["orchestrator-2"]]
    async with Client(system) as client:
        holder = await the_relay_holder(orchestrators)
        other = next(process for process in orchestrators if process is not holder)

        # The relay's holder freezes: its session lock must go, the other relays.
        holder.freeze()
        frozen = time.monotonic()
        try:
            holder_frozen_s = await jobs_complete_after(client, frozen, 0)
            assert holds_relay(other)
        finally:
            holder.thaw()

        # Now the other way round: the replica that does not relay freezes with the
        # messages its consumer had taken (once it consumes again after its thaw).
        await eventually(lambda: not holds_relay(holder), timeout=30, what="the thawed relay")
        await holder.wait_ready(timeout=60)
        holder.freeze()
        frozen = time.monotonic()
        try:
            consumer_frozen_s = await jobs_complete_after(client, frozen, JOBS)
        finally:
            holder.thaw()

    print(
        f"fault frozen-orchestrator: relay_holder_frozen_s={holder_frozen_s:.1f} "
        f"consumer_frozen_s={consumer_frozen_s:.1f}",
        flush=True,
    )
    assert holder_frozen_s < WITHIN and consumer_frozen_s < WITHIN
    assert log_problems(system) == []


async def test_a_relay_that_cannot_reach_the_broker_hands_the_relay_over(
    make_system: MakeSystem,
) -> None:
    proxies = [await open_proxy(amqp_url()) for _ in range(2)]
    names = ("orchestrator", "orchestrator-2")
    try:
        system = await make_system(
            replicas=[("orchestrator", "orchestrator-2")],
            env_of={
                name: {"AMQP_URL": proxy.url(amqp_url())}
                for name, proxy in zip(names, proxies, strict=True)
            },
        )
        orchestrators = [system.processes[name] for name in names]
        async with Client(system) as client:
            holder = await the_relay_holder(orchestrators)
            other = next(process for process in orchestrators if process is not holder)
            # The holder is cut off from the broker; it still reaches the database.
            proxies[orchestrators.index(holder)].cut()
            cut = time.monotonic()
            cut_off_s = await jobs_complete_after(client, cut, 0)
            assert holds_relay(other)
        print(f"fault relay-cut-off: jobs={JOBS} completed_within_s={cut_off_s:.1f}", flush=True)
        assert cut_off_s < WITHIN
        assert log_problems(system) == []
    finally:
        for proxy in proxies:
            await proxy.stop()
