"""Poison messages published straight onto every service's queue (the orchestrator's,
the generators' work queue, a notifier's own queue and, where the generator has one, its
control queue): each is dead-lettered to that queue's .dlq with the reason in the
``x-canvas-error`` header, logged by the service that consumed it ("message
dead-lettered"), and the consumer goes on: a job submitted afterwards completes, and its
status reaches the client over the notifier's WebSocket.

The poisons: a body that is not JSON, an unknown event type, a schema_version from the
future, an envelope missing required fields, and an event whose data misses required
fields (for a cancel, whose data has none, one missing the job it is about).
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from canvas_events.broker import ERROR_HEADER
from canvas_events.events import EVENT_TYPES
from canvas_events.topology import JOB, Topology, routing_key
from tests.faults.conftest import MakeSystem
from tests.faults.harness import (
    Client,
    assert_completed,
    eventually,
    figures,
    lines,
    log_problems,
    query,
)
from tests.support.system import System


@dataclass(frozen=True)
class Poison:
    """One bad message, and what the reason for dead-lettering it must say."""

    kind: str
    body: bytes
    reason: str


def poisons(event_type: str) -> list[Poison]:
    """The five poisons, typed for a queue whose consumer expects ``event_type``."""

    def envelope(**fields: Any) -> bytes:
        body = {
            "event_id": str(uuid.uuid4()),
            "type": event_type,
            "schema_version": 1,
            "occurred_at": "2030-01-01T00:00:00+00:00",
            "correlation_id": f"poison-{uuid.uuid4().hex[:8]}",
            "job_id": str(uuid.uuid4()),
            "user_id": "poison-user",
            "canvas_id": "poison-canvas",
            # Recorded events carry a position: the notifier looks only at those.
            "position": 1,
            "data": {},
            **fields,
        }
        return json.dumps({k: v for k, v in body.items() if v is not None}).encode()

    return [
        Poison("not_json", b"{this is not json", "not JSON"),
        Poison("unknown_type", envelope(type="JobExploded"), "unknown event type"),
        Poison("future_schema", envelope(schema_version=99), "schema_version 99"),
        Poison(
            "missing_envelope_fields",
            envelope(event_id=None, correlation_id=None, occurred_at=None, job_id=None),
            "not a valid envelope",
        ),
        _missing_data_fields(event_type, envelope),
    ]


def _missing_data_fields(event_type: str, envelope: Callable[..., bytes]) -> Poison:
    """An event without the data its schema requires; for an event whose data has no
    required field (a cancel), one without the job it is about."""
    required = any(field.is_required() for field in EVENT_TYPES[event_type].model_fields.values())
    if required:
        return Poison("missing_data_fields", envelope(data={}), "does not fit schema")
    return Poison("missing_job_id", envelope(job_id=None), "without a job_id")


@dataclass(frozen=True)
class Target:
    """A queue to poison: how to reach it, where its dead letters go, who consumes it."""

    name: str
    exchange: str  # "" is the default exchange: the routing key is the queue's name
    routing_key: str
    dead_letter_queue: str
    process: str
    event_type: str
    queue_prefix: str  # x-canvas-queue of its dead letters starts with this


def targets(system: System, topology: Topology) -> list[Target]:
    """Every service queue of the running system."""
    notifier_connection = next(
        line["connection"]
        for line in lines(system.processes["notifier"], "broker connected")
        if "connection" in line
    )
    notifier_queue = topology.notifier(notifier_connection).name
    found = [
        Target(
            "orchestrator",
            "",
            topology.orchestrator.name,
            topology.orchestrator.dead_letter_queue,
            "orchestrator",
            "JobRequested",
            topology.orchestrator.name,
        ),
        Target(
            "generator-work",
            "",
            topology.generator_work.name,
            topology.generator_work.dead_letter_queue,
            "generator",
            "GenerationRequested",
            topology.generator_work.name,
        ),
        Target(
            "notifier",
            "",
            notifier_queue,
            topology.notifier(notifier_connection).dead_letter_queue,
            "notifier",
            "JobQueued",
            notifier_queue,
        ),
    ]
    if importlib.util.find_spec("canvas_generator.cancellations") is not None:
        # Its name has a random part nobody logs; its binding reaches it (and every
        # notifier's queue, whose copies the notifier target does not count).
        control = topology.generator_control("x")
        found.append(
            Target(
                "generator-control",
                topology.exchange,
                routing_key(JOB, "JobCancelRequested"),
                control.dead_letter_queue,
                "generator",
                "JobCancelRequested",
                control.name.removesuffix("x"),
            )
        )
    return found


async def drain(
    channel: AbstractChannel,
    queue_name: str,
    wanted: set[str],
    *,
    timeout: float = 20,
) -> dict[str, AbstractIncomingMessage]:
    """The messages of a dead-letter queue with the wanted message ids (others are left
    out), once all of them arrived."""
    queue = await channel.declare_queue(queue_name, passive=True)
    found: dict[str, AbstractIncomingMessage] = {}

    async def all_there() -> bool:
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            if message.message_id in wanted:
                found[message.message_id] = message
        return wanted <= set(found)

    try:
        await eventually(all_there, timeout=timeout, what=f"dead letters on {queue_name}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; never arrived: {sorted(wanted - set(found))}") from None
    return found


async def test_poison_messages_on_every_queue_are_dead_lettered_logged_and_the_consumers_go_on(
    make_system: MakeSystem,
) -> None:
    system = await make_system()
    topology = Topology(system.prefix)
    plan = targets(system, topology)
    sent: dict[str, dict[str, Poison]] = {}
    connection = await aio_pika.connect(system.amqp_url)
    async with connection:
        channel = await connection.channel()
        for target in plan:
            exchange = (
                channel.default_exchange
                if not target.exchange
                else await channel.get_exchange(target.exchange)
            )
            sent[target.name] = {}
            for poison in poisons(target.event_type):
                message_id = f"poison-{target.name}-{poison.kind}-{uuid.uuid4().hex[:6]}"
                await exchange.publish(
                    aio_pika.Message(poison.body, message_id=message_id),
                    target.routing_key,
                )
                sent[target.name][message_id] = poison

        dead: dict[str, dict[str, AbstractIncomingMessage]] = {}
        for target in plan:
            dead[target.name] = await drain(
                channel, target.dead_letter_queue, set(sent[target.name])
            )

    problems = []
    for target in plan:
        process = system.processes[target.process]

        def logged(p: Any = process) -> Callable[[], Any]:
            async def check() -> set[str]:
                return {str(line.get("message_id")) for line in lines(p, "message dead-lettered")}

            return check

        logged_ids = await eventually(
            _contains(logged(), set(sent[target.name])),
            timeout=10,
            what=f"{target.process} to log its dead letters",
        )
        for message_id, poison in sent[target.name].items():
            message = dead[target.name][message_id]
            headers = message.headers or {}
            reason = str(headers.get(ERROR_HEADER, ""))
            if poison.reason.lower() not in reason.lower():
                problems.append(f"{target.name}/{poison.kind}: reason {reason!r}")
            if not str(headers.get("x-canvas-queue", "")).startswith(target.queue_prefix):
                problems.append(
                    f"{target.name}/{poison.kind}: from {headers.get('x-canvas-queue')!r}"
                )
            if message.body != poison.body:
                problems.append(f"{target.name}/{poison.kind}: body changed")
            if message_id not in logged_ids:
                problems.append(f"{target.name}/{poison.kind}: not logged by {target.process}")
        for line in lines(process, "message dead-lettered"):
            if line.get("message_id") in sent[target.name]:
                assert line["level"] == "error" and line["reason"], line

    # The consumers went on: a normal job flows through every one of them.
    async with Client(system) as client, client.socket() as socket:
        job = await client.submit(query(0))
        frames = await socket.until(job.job_id, "ai_generation_completed", timeout=20)
        outcome = await client.outcome([job], timeout=20)

    dead_lettered = sum(len(items) for items in dead.values())
    figures(
        "poison-messages",
        outcome,
        faults=sum(len(items) for items in sent.values()),
        dead_lettered=dead_lettered,
        queues=len(plan),
    )
    assert problems == []
    assert_completed(outcome, 1)
    assert frames[-1]["type"] == "ai_generation_completed"
    assert log_problems(system) == []


def _contains(check: Callable[[], Any], wanted: set[str]) -> Callable[[], Any]:
    async def contains() -> set[str] | None:
        found: set[str] = await check()
        return found if wanted <= found else None

    return contains
