"""Restart RabbitMQ in the middle of a run: every service reconnects on its own, every
consumer is back, nothing is lost.

The broker restarted here is a private node this test starts from the installed
binaries (tests/support/servers.py), never the one named by AMQP_URL: restarting a
shared broker would break every other test running against it and the developer's own
``make dev``, and a broker named by AMQP_URL may be remote, out of our hands. The node
is stopped with ``rabbitmqctl stop`` and started again on the same data directory (a
real process restart: durable queues and persistent messages survive it, connections
do not), and the fixture stops and removes it whatever happens.

Why nothing is lost: the work and orchestrator queues are durable and every message is
persistent and acked only after its effect, so what was queued or in hand comes back
with the broker; what the generators were computing is published once they reconnect
(a publish that fails leaves the work unacked, so it is handed out again); events the
orchestrator recorded meanwhile wait in the event store for its relay.
"""

from __future__ import annotations

import asyncio
import importlib.util

from tests.faults.conftest import MakeSystem
from tests.faults.harness import eventually, restart_mid_run
from tests.support.servers import PrivateRabbitMQ


async def test_broker_restarted_mid_run_services_reconnect_and_nothing_is_lost(
    private_rabbitmq: PrivateRabbitMQ, make_system: MakeSystem
) -> None:
    system = await make_system(amqp=private_rabbitmq.url, MAX_CONCURRENT_JOBS=5)
    services = [p for name, p in system.processes.items() if name != "fake-openai"]
    prefix = system.prefix
    wanted = [
        f"{prefix}.job-orchestrator",
        f"{prefix}.ai-generator.work",
        f"{prefix}.notifier.",
    ]
    if importlib.util.find_spec("canvas_generator.cancellations") is not None:
        wanted.append(f"{prefix}.ai-generator.control.")

    async def consumers_back() -> dict[str, tuple[int, int]] | None:
        queues = await asyncio.to_thread(private_rabbitmq.queues)
        mine = {name: stats for name, stats in queues.items() if name.startswith(prefix)}
        consumed = [name for name, (_, consumers) in mine.items() if consumers >= 1]
        ok = all(any(name.startswith(w) for name in consumed) for w in wanted)
        return mine if ok else None

    async def every_consumer_back() -> dict[str, object]:
        # Every consumer is back on its queue (aio-pika's robust connections are known
        # to come back without them after an ungraceful restart: docs/events.md, "Topology").
        queues = await eventually(consumers_back, timeout=20, what="every consumer back")
        return {"queues": len(queues)}

    # New work then goes through the reconnected gateway, relay and consumers too.
    await restart_mid_run(
        system,
        "broker-restart",
        lambda: asyncio.to_thread(private_rabbitmq.restart),
        services,
        then=every_consumer_back,
    )
