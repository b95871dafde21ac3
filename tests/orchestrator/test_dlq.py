"""``canvas-orchestrator dlq``: dead-lettered messages listed with their reason and
replayed after the cause is fixed, on the real RabbitMQ (and, end to end, the whole
system as real processes on the real PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from canvas_events.broker import (
    ATTEMPTS_HEADER,
    DELIVERY_COUNT_HEADER,
    ERROR_HEADER,
    declare_topology,
)
from canvas_events.topology import Topology
from canvas_orchestrator import dlq
from tests.orchestrator.harness import eventually
from tests.support.env import admin_connection
from tests.support.system import System
from tests.support.users import User

COMMAND = str(Path(sys.executable).parent / "canvas-orchestrator")


# -- helpers --------------------------------------------------------------------------


@pytest.fixture
async def channel(amqp_url: str, topology: Topology) -> AsyncIterator[AbstractChannel]:
    """A channel on which the test's topology is declared, as every service does."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(connection, channel, topology)
        yield channel


def envelope_body(type_name: str = "JobRequested", **fields: Any) -> bytes:
    body = {
        "event_id": str(uuid.uuid4()),
        "type": type_name,
        "schema_version": 1,
        "job_id": str(uuid.uuid4()),
        "correlation_id": f"req-{uuid.uuid4().hex[:8]}",
        "data": {},
        **fields,
    }
    return json.dumps(body).encode()


async def put_dead_letter(
    channel: AbstractChannel,
    topology: Topology,
    body: bytes,
    *,
    queue: str | None = None,
    routing_key: str = "gateway.JobRequested",
    reason: str = "failed 5 times; last: RuntimeError: boom",
    message_id: str | None = None,
    extra_headers: dict[str, Any] | None = None,
) -> str:
    """Put a message into the orchestrator's .dlq the way Broker._dead_letter does."""
    source = queue or topology.orchestrator.name
    message_id = message_id if message_id is not None else str(uuid.uuid4())
    headers: dict[str, Any] = {
        ERROR_HEADER: reason,
        "x-canvas-queue": source,
        "x-canvas-routing-key": routing_key,
        "x-canvas-dead-lettered-at": "2030-01-02T03:04:05+00:00",
        ATTEMPTS_HEADER: 4,
        "x-trace": "kept",
        **(extra_headers or {}),
    }
    exchange = await channel.get_exchange(topology.dead_letter_exchange)
    await exchange.publish(
        aio_pika.Message(
            body,
            headers=headers,
            message_id=message_id or None,
            type="JobRequested",
            content_type="application/json",
            priority=7,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        topology.orchestrator.dead_letter_queue,
    )
    return message_id


async def drain(channel: AbstractChannel, queue_name: str) -> list[AbstractIncomingMessage]:
    """Every message now in ``queue_name``, taken off it."""
    queue = await channel.declare_queue(queue_name, passive=True)
    messages = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        messages.append(message)
    return messages


async def ids_in(url: str, topology: Topology, queue: str) -> list[str]:
    listing = await dlq.list_dead_letters(url, topology, queues=[queue])
    return [message.message_id for message in listing.messages]


# -- listing --------------------------------------------------------------------------


async def test_list_shows_reason_origin_and_job_and_leaves_every_message_in_place(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    body = envelope_body()
    message_id = await put_dead_letter(channel, topology, body)

    listing = await dlq.list_dead_letters(
        amqp_url, topology, queues=list(topology.dead_letter_queues)
    )
    again = await dlq.list_dead_letters(
        amqp_url, topology, queues=list(topology.dead_letter_queues)
    )

    dlq_name = topology.orchestrator.dead_letter_queue
    assert {count.queue: count.messages for count in listing.queues} == {
        name: (1 if name == dlq_name else 0) for name in topology.dead_letter_queues
    }
    [message] = listing.messages
    assert message == dlq.DeadLetteredMessage(
        queue=dlq_name,
        message_id=message_id,
        type="JobRequested",
        job_id=json.loads(body)["job_id"],
        correlation_id=json.loads(body)["correlation_id"],
        original_queue=topology.orchestrator.name,
        routing_key="gateway.JobRequested",
        reason="failed 5 times; last: RuntimeError: boom",
        dead_lettered_at="2030-01-02T03:04:05+00:00",
        dead_lettered_by="consumer",
        body_bytes=len(body),
    )
    assert again.messages == listing.messages


async def test_list_limit_shows_the_oldest_and_counts_them_all(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    ids = [await put_dead_letter(channel, topology, envelope_body()) for _ in range(3)]
    dlq_name = topology.orchestrator.dead_letter_queue

    listing = await dlq.list_dead_letters(amqp_url, topology, queues=[dlq_name], limit=2)

    assert [message.message_id for message in listing.messages] == ids[:2]
    assert listing.queues == [dlq.QueueCount(dlq_name, 3)]
    assert await ids_in(amqp_url, topology, dlq_name) == ids


async def test_list_explains_a_message_the_broker_dead_lettered_from_its_x_death(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    exchange = await channel.get_exchange(topology.exchange)
    body = envelope_body()
    await exchange.publish(
        aio_pika.Message(body, message_id="rejected-1", type="JobRequested"),
        "gateway.JobRequested",
    )
    queue = await channel.declare_queue(topology.orchestrator.name, passive=True)
    taken = await eventually(lambda: queue.get(fail=False), what="the published message")
    # What a consumer does when it cannot reach the DLX: the queue's own dead-lettering.
    await taken.reject(requeue=False)
    dlq_name = topology.orchestrator.dead_letter_queue

    listing = await eventually(
        lambda: _non_empty(dlq.list_dead_letters(amqp_url, topology, queues=[dlq_name])),
        what="the broker to dead-letter the message",
    )

    [message] = listing.messages
    assert message.dead_lettered_by == "broker"
    assert message.reason == "rejected by the broker (x-death)"
    assert (message.original_queue, message.routing_key) == (
        topology.orchestrator.name,
        "gateway.JobRequested",
    )
    assert message.dead_lettered_at is not None
    assert message.job_id == json.loads(body)["job_id"]

    report = await dlq.replay(amqp_url, topology, queues=[dlq_name], message_ids=["rejected-1"])

    assert [destination for _, destination in report.replayed] == [
        f"queue {topology.orchestrator.name}"
    ]
    [back] = await drain(channel, topology.orchestrator.name)
    assert back.body == body
    assert "x-death" not in (back.headers or {})


async def _non_empty(listing_call: Any) -> dlq.Listing | None:
    listing: dlq.Listing = await listing_call
    return listing if listing.messages else None


async def test_a_message_that_is_not_an_envelope_is_listed_and_replayed_by_its_id(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    message_id = await put_dead_letter(channel, topology, b"\x00 not json")
    dlq_name = topology.orchestrator.dead_letter_queue

    [message] = (await dlq.list_dead_letters(amqp_url, topology, queues=[dlq_name])).messages

    assert (message.message_id, message.job_id, message.body_bytes) == (message_id, None, 10)
    report = await dlq.replay(amqp_url, topology, queues=[dlq_name], message_ids=[message_id])
    assert len(report.replayed) == 1
    [back] = await drain(channel, topology.orchestrator.name)
    assert back.body == b"\x00 not json"


def test_a_message_without_an_id_is_known_by_its_event_id_or_else_its_body_hash() -> None:
    # aio-pika always sets a message id; another client (the management UI) may not.
    def stub(body: bytes) -> Any:
        return SimpleNamespace(message_id=None, body=body)

    event_id = str(uuid.uuid4())

    assert dlq.message_key(stub(json.dumps({"event_id": event_id}).encode())) == event_id
    assert dlq.message_key(stub(b"junk")) == dlq.message_key(stub(b"junk"))
    assert dlq.message_key(stub(b"junk")).startswith("sha256:")
    assert dlq.message_key(stub(b"junk")) != dlq.message_key(stub(b"other junk"))


# -- replaying ------------------------------------------------------------------------


async def test_replay_sends_the_chosen_message_back_clean_and_keeps_the_rest_in_order(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    bodies = [envelope_body() for _ in range(4)]
    ids = [await put_dead_letter(channel, topology, body) for body in bodies]
    dlq_name = topology.orchestrator.dead_letter_queue

    report = await dlq.replay(amqp_url, topology, queues=[dlq_name], message_ids=[ids[1], ids[2]])

    assert [(m.message_id, where) for m, where in report.replayed] == [
        (ids[1], f"queue {topology.orchestrator.name}"),
        (ids[2], f"queue {topology.orchestrator.name}"),
    ]
    assert (report.failed, report.not_found) == ([], [])
    back = await drain(channel, topology.orchestrator.name)
    assert [m.message_id for m in back] == [ids[1], ids[2]]
    assert [m.body for m in back] == [bodies[1], bodies[2]]
    first = back[0]
    # Attempts reset and no trace of the dead-lettering; everything else as published.
    # (A quorum queue adds its x-delivery-count to each delivery, the drain's here.)
    assert {k: v for k, v in first.headers.items() if k != DELIVERY_COUNT_HEADER} == {
        "x-trace": "kept"
    }
    assert (first.type, first.content_type, first.priority) == (
        "JobRequested",
        "application/json",
        7,
    )
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert await ids_in(amqp_url, topology, dlq_name) == [ids[0], ids[3]]


async def test_replay_all_empties_every_dead_letter_queue(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    ids = [await put_dead_letter(channel, topology, envelope_body()) for _ in range(3)]

    report = await dlq.replay(
        amqp_url, topology, queues=list(topology.dead_letter_queues), message_ids=None
    )

    assert [m.message_id for m, _ in report.replayed] == ids
    assert [m.message_id for m in await drain(channel, topology.orchestrator.name)] == ids
    listing = await dlq.list_dead_letters(
        amqp_url, topology, queues=list(topology.dead_letter_queues)
    )
    assert listing.messages == []


async def test_replay_goes_through_the_events_exchange_when_the_original_queue_is_gone(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    # A notifier's queue goes with its process; the routing key still reaches the others.
    listener = await channel.declare_queue(exclusive=True)
    await listener.bind(topology.exchange, "job.JobQueued")
    message_id = await put_dead_letter(
        channel,
        topology,
        envelope_body("JobQueued"),
        queue=f"{topology.prefix}.notifier.gone-instance",
        routing_key="job.JobQueued",
    )

    report = await dlq.replay(
        amqp_url,
        topology,
        queues=[topology.orchestrator.dead_letter_queue],
        message_ids=[message_id],
    )

    assert [where for _, where in report.replayed] == [
        f"exchange {topology.exchange} (job.JobQueued)"
    ]
    [back] = await drain(channel, listener.name)
    assert back.message_id == message_id


async def test_a_message_with_nowhere_to_go_stays_in_the_dead_letter_queue(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    message_id = await put_dead_letter(
        channel,
        topology,
        envelope_body(),
        queue=f"{topology.prefix}.nobody",
        routing_key="nobody.listens",
    )
    dlq_name = topology.orchestrator.dead_letter_queue

    report = await dlq.replay(
        amqp_url, topology, queues=[dlq_name], message_ids=[message_id, "no-such-id"]
    )

    assert report.replayed == []
    assert [(m.message_id, error) for m, error in report.failed] == [
        (message_id, "no queue is bound to routing key nobody.listens")
    ]
    assert report.not_found == ["no-such-id"]
    assert await ids_in(amqp_url, topology, dlq_name) == [message_id]


# -- dropping -------------------------------------------------------------------------


async def test_drop_without_confirmation_counts_the_chosen_and_drops_nothing(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    ids = [await put_dead_letter(channel, topology, envelope_body()) for _ in range(3)]
    dlq_name = topology.orchestrator.dead_letter_queue

    report = await dlq.drop(
        amqp_url, topology, queues=[dlq_name], message_ids=[ids[0], ids[2]], confirmed=False
    )

    assert [m.message_id for m in report.chosen] == [ids[0], ids[2]]
    assert not report.confirmed
    assert await ids_in(amqp_url, topology, dlq_name) == ids


async def test_drop_confirmed_removes_the_chosen_for_good_and_keeps_the_rest_in_order(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    ids = [await put_dead_letter(channel, topology, envelope_body()) for _ in range(4)]
    dlq_name = topology.orchestrator.dead_letter_queue

    report = await dlq.drop(
        amqp_url,
        topology,
        queues=[dlq_name],
        message_ids=[ids[1], ids[2], "no-such-id"],
        confirmed=True,
    )

    assert [m.message_id for m in report.chosen] == [ids[1], ids[2]]
    assert report.not_found == ["no-such-id"]
    assert await ids_in(amqp_url, topology, dlq_name) == [ids[0], ids[3]]
    # Dropped, not replayed: nothing went back to the queue it came from.
    assert await drain(channel, topology.orchestrator.name) == []


async def test_drop_command_asks_for_yes_then_drops_all_and_counts_them(
    amqp_url: str, topology: Topology, channel: AbstractChannel
) -> None:
    ids = [await put_dead_letter(channel, topology, envelope_body()) for _ in range(3)]
    env = {"AMQP_URL": amqp_url, "AMQP_TOPOLOGY_PREFIX": topology.prefix}
    dlq_name = topology.orchestrator.dead_letter_queue

    dry = await run_command("drop", "--all", env=env)
    assert dry[0] == 2
    assert "would drop 3 message(s); nothing dropped: run again with --yes" in dry[1]
    assert await ids_in(amqp_url, topology, dlq_name) == ids

    code, stdout, stderr = await run_command("drop", "--all", "--yes", "--json", env=env)
    assert code == 0, stderr
    answer = json.loads(stdout)
    assert answer["count"] == 3
    assert [m["message_id"] for m in answer["dropped"]] == ids
    assert await ids_in(amqp_url, topology, dlq_name) == []
    # Each drop is on record, findable by its job like every other step.
    dropped = [json.loads(line) for line in stderr.splitlines() if "dead letter dropped" in line]
    assert [line["message_id"] for line in dropped] == ids

    no_ids = await run_command("drop", "--yes", env=env)
    assert no_ids[0] == 2
    assert "MESSAGE_ID" in no_ids[2]


def test_queue_is_named_by_its_dlq_or_by_the_queue_it_serves() -> None:
    topology = Topology("canvas")

    assert dlq.resolve_queues(topology, "canvas.job-orchestrator") == [
        "canvas.job-orchestrator.dlq"
    ]
    assert dlq.resolve_queues(topology, "canvas.ai-generator.work.dlq") == [
        "canvas.ai-generator.work.dlq"
    ]
    assert dlq.resolve_queues(topology, None) == list(topology.dead_letter_queues)
    with pytest.raises(ValueError, match=r"canvas\.notifier\.dlq"):
        dlq.resolve_queues(topology, "canvas.elsewhere")


# -- the command ----------------------------------------------------------------------


async def run_command(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        COMMAND,
        "dlq",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_command_with_the_broker_away_exits_1_and_never_prints_the_password() -> None:
    password = "dlq-secret-password-4711"

    code, stdout, stderr = await run_command(
        "list", env={"AMQP_URL": f"amqp://ops:{password}@127.0.0.1:1/", "LOG_FORMAT": "json"}
    )

    assert code == 1
    assert "cannot reach the broker" in stderr
    assert password not in stdout + stderr


async def test_command_refuses_an_unknown_queue_and_a_replay_without_ids(
    amqp_url: str, topology: Topology
) -> None:
    env = {"AMQP_URL": amqp_url, "AMQP_TOPOLOGY_PREFIX": topology.prefix}

    unknown = await run_command("list", "--queue", "elsewhere", env=env)
    no_ids = await run_command("replay", env=env)

    assert unknown[0] == 2
    assert topology.orchestrator.dead_letter_queue in unknown[2]
    assert no_ids[0] == 2
    assert "MESSAGE_ID" in no_ids[2]


# -- end to end: a fixable cause ------------------------------------------------------


@pytest.fixture
async def orchestrator_role(database_url: str) -> AsyncIterator[str]:
    """A login role of its own that owns the test database, so the orchestrator migrates
    and owns its tables as it would in production, and a grant can be taken away; the
    URL the orchestrator connects with. Drops the database before the role."""
    role = f"cj_dlq_{uuid.uuid4().hex[:10]}"
    database = urlsplit(database_url).path.lstrip("/")
    async with admin_connection() as admin:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'ALTER DATABASE "{database}" OWNER TO "{role}"')
    yield urlunsplit(urlsplit(database_url)._replace(netloc=_with_user(database_url, role)))
    async with admin_connection() as admin:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def _with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return f"{user}@{host}"


@pytest.fixture
async def system(
    database_url: str,
    orchestrator_role: str,
    amqp_url: str,
    topology: Topology,
    tmp_path: Path,
) -> AsyncIterator[System]:
    """The whole system; only the orchestrator connects as the restricted role."""
    running = System(database_url, amqp_url, topology.prefix, tmp_path)
    orchestrator = running.processes["orchestrator"]
    orchestrator.env = {**orchestrator.env, "DATABASE_URL": orchestrator_role}
    try:
        await running.start()
        yield running
    finally:
        running.stop()


@pytest.mark.e2e
async def test_job_dead_lettered_while_a_grant_was_missing_completes_after_replay(
    system: System, database_url: str, orchestrator_role: str, topology: Topology
) -> None:
    role = urlsplit(orchestrator_role).username
    env = {"AMQP_URL": system.amqp_url, "AMQP_TOPOLOGY_PREFIX": topology.prefix}
    admin = await asyncpg.connect(database_url)
    try:
        # The cause: someone took the orchestrator's right to append to the event store.
        await admin.execute(f'REVOKE INSERT ON events FROM "{role}"')
        async with User(system, "dora") as dora:
            job_id, _ = await dora.submit("a flowchart of a login flow")

            async def dead_lettered() -> dict[str, Any] | None:
                code, stdout, stderr = await run_command("list", "--json", env=env)
                assert code == 0, stderr
                found = [m for m in json.loads(stdout)["messages"] if m["job_id"] == job_id]
                return found[0] if found else None

            message = await eventually(dead_lettered, timeout=60, what="the dead letter")
            assert message["queue"] == topology.orchestrator.dead_letter_queue
            assert message["type"] == "JobRequested"
            assert message["original_queue"] == topology.orchestrator.name
            assert message["dead_lettered_by"] == "consumer"
            assert "failed 5 times" in message["reason"]
            assert "permission denied for table events" in message["reason"]
            code, text, _ = await run_command("list", env=env)
            assert code == 0
            assert message["message_id"] in text
            assert "permission denied for table events" in text

            # The fix, then the replay of exactly that message.
            await admin.execute(f'GRANT INSERT ON events TO "{role}"')
            code, stdout, stderr = await run_command(
                "replay", message["message_id"], "--queue", topology.orchestrator.name, env=env
            )
            assert code == 0, stdout + stderr
            assert f"to queue {topology.orchestrator.name}" in stdout
            replay_logs = [json.loads(line) for line in stderr.splitlines() if line.strip()]
            assert any(
                line["event"] == "dead letter replayed" and line["job_id"] == job_id
                for line in replay_logs
            )

            final = await dora.until_status(job_id, "completed", "failed", "cancelled", timeout=60)
            assert final["status"] == "completed"
            types = [event["type"] for event in await dora.events(job_id)]
            assert types[0] == "JobRequested"
            assert types[-1] == "JobCompleted"
    finally:
        await admin.close()

    code, stdout, _ = await run_command("list", "--json", env=env)
    assert code == 0
    assert json.loads(stdout)["messages"] == []
    orchestrator_log = system.processes["orchestrator"].log_lines()
    assert any(
        line["event"] == "message dead-lettered" and line.get("job_id") == job_id
        for line in orchestrator_log
    )
