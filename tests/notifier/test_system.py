"""The notifier among the real services, every one a process of its own: resume without
gap or duplicate while 30 jobs run at once, two notifier processes side by side, and a
client that never reads on a real notifier process."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import websockets

from canvas_events.topology import Topology
from canvas_notifier.frames import STATUS_TYPES
from tests.conftest import delete_topology
from tests.notifier import support
from tests.notifier.support import RawClient, recorded
from tests.support.env import amqp_url, create_database, database_url, drop_database
from tests.support.processes import ServiceProcess, free_port
from tests.support.proxy import open_proxy
from tests.support.system import System
from tests.support.users import is_final

pytestmark = pytest.mark.e2e

SECOND = "notifier-2"
# The second notifier's outbox bound: small, so that a client that never reads is
# closed after a few dozen frames (the first notifier keeps the default).
SECOND_QUEUE_SIZE = 64
# The second notifier reads the event store through a proxy that makes every answer
# this late: each replay then lasts long enough for live events to arrive meanwhile,
# so that reconnects to it cross the replay/live seam again and again.
SECOND_DATABASE_DELAY = 0.05


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    name = f"cj_notifier_{uuid.uuid4().hex[:12]}"
    await create_database(database_url(name))
    prefix = f"n{uuid.uuid4().hex[:10]}"
    log_dir: Path = tmp_path_factory.mktemp("notifier-system-logs")
    slow_database = await open_proxy(database_url(name), delay=SECOND_DATABASE_DELAY)
    running = System(
        database_url(name),
        amqp_url(),
        prefix,
        log_dir,
        extra_env={
            "MAX_ACTIVE_JOBS_PER_USER": "100",
            # Jobs that last a little, so that reconnects land while events flow.
            "FAKE_OPENAI_DELAY_MS": "150",
        },
    )
    port = free_port()
    running.ports[SECOND] = port
    running.processes[SECOND] = ServiceProcess(
        SECOND,
        ["canvas-notifier"],
        {
            **running.env,
            "DATABASE_URL": slow_database.url(database_url(name)),
            "NOTIFIER_PORT": str(port),
            "WS_SEND_QUEUE_SIZE": str(SECOND_QUEUE_SIZE),
        },
        log_dir,
        f"http://127.0.0.1:{port}/ready",
    )
    try:
        await running.start()
        yield running
    finally:
        running.stop()
        await slow_database.stop()
        await delete_topology(amqp_url(), Topology(prefix))
        await drop_database(database_url(name))


async def post_jobs(system: System, token: str, count: int) -> list[str]:
    """``count`` jobs posted at once; their ids."""
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
        answers = await asyncio.gather(
            *(
                http.post(
                    "/api/ai-agent/create-canvas",
                    json={"query": f"a flowchart number {index}"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                for index in range(count)
            )
        )
    assert all(answer.status_code == 202 for answer in answers), [a.text for a in answers]
    return [answer.json()["job_id"] for answer in answers]


async def status_events(system: System, token: str, job_ids: list[str]) -> dict[int, str]:
    """Position → job id of every event the notifier shows, from the gateway's event API."""
    expected: dict[int, str] = {}
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
        for job_id in job_ids:
            answer = await http.get(
                f"/api/ai-agent/job/{job_id}/events",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert answer.status_code == 200, answer.text
            for event in answer.json()["events"]:
                if event["type"] in STATUS_TYPES:
                    expected[event["position"]] = job_id
    return expected


async def test_a_client_reconnecting_with_after_over_and_over_sees_every_event_of_30_concurrent_jobs_once_in_order(  # noqa: E501
    system: System,
) -> None:
    user, other = f"resume-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    token = system.token(user)
    draw = random.Random(20250101)  # reproducible: how many frames before each drop
    seen: list[dict[str, Any]] = []
    finals: set[str] = set()
    job_ids: list[str] = []
    posted = asyncio.Event()
    reconnects = 0
    closes: list[int] = []

    async def follow() -> None:
        """Read a few frames, drop the connection without a close, reconnect with
        after=<last position seen>, to either notifier in turn; until every job ended.
        A close from the notifier (4008 when a burst outgrows the outbox during a
        replay) is one more reconnect, as the contract tells clients to do."""
        nonlocal reconnects
        after = 0
        while True:
            notifier = ("notifier", SECOND)[reconnects % 2]
            url = system.websocket_url(token, after, notifier=notifier)
            connection = await websockets.connect(url)
            try:
                for _ in range(draw.randint(1, 4)):
                    frame = json.loads(await connection.recv())
                    assert "position" in frame, frame  # no control frame was asked for
                    seen.append(frame)
                    after = frame["position"]
                    if is_final(frame):
                        finals.add(frame["job_id"])
                    if posted.is_set() and finals >= set(job_ids):
                        return
            except websockets.ConnectionClosed as closed:
                closes.append(closed.rcvd.code if closed.rcvd else 1006)
            finally:
                # Abrupt: no closing handshake; the notifier learns it from the socket.
                connection.transport.abort()
                await connection.wait_closed()
            reconnects += 1

    following = asyncio.create_task(follow())
    # Another user's jobs at the same time: their positions interleave with ours.
    mine, _ = await asyncio.gather(
        post_jobs(system, token, 30), post_jobs(system, system.token(other), 10)
    )
    job_ids.extend(mine)
    posted.set()
    try:
        async with asyncio.timeout(90):
            await following
    except TimeoutError:
        pass  # the assertions below say what is missing
    finally:
        following.cancel()

    expected = await status_events(system, token, job_ids)
    positions = [frame["position"] for frame in seen]
    missing = sorted(set(expected) - set(positions))
    assert not missing, f"never received positions {missing} (after {reconnects} reconnects)"
    assert positions == sorted(expected), "a duplicate, an event out of order or not ours"
    assert all(frame["job_id"] == expected[frame["position"]] for frame in seen)
    assert len(expected) >= 3 * 30  # queued, started, completed at least, for each job
    assert reconnects >= 20, reconnects
    assert set(closes) <= {4008}, closes


async def test_two_notifier_processes_each_deliver_every_event_of_their_users(
    system: System,
) -> None:
    alice, bob = f"alice-{uuid.uuid4().hex[:8]}", f"bob-{uuid.uuid4().hex[:8]}"
    alice_token, bob_token = system.token(alice), system.token(bob)
    # after=0: these users have nothing yet, so every event of theirs must arrive.
    url = system.websocket_url
    clients = {
        ("notifier", alice): await websockets.connect(url(alice_token, 0)),
        (SECOND, alice): await websockets.connect(url(alice_token, 0, notifier=SECOND)),
        (SECOND, bob): await websockets.connect(url(bob_token, 0, notifier=SECOND)),
    }
    try:
        alice_jobs, bob_jobs = await asyncio.gather(
            post_jobs(system, alice_token, 8), post_jobs(system, bob_token, 4)
        )
        jobs = {alice: alice_jobs, bob: bob_jobs}
        received: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in clients}

        async def read(key: tuple[str, str]) -> None:
            finals: set[str] = set()
            while finals != set(jobs[key[1]]):
                frame = json.loads(await clients[key].recv())
                received[key].append(frame)
                if is_final(frame):
                    finals.add(frame["job_id"])

        async with asyncio.timeout(60):
            await asyncio.gather(*(read(key) for key in clients))
    finally:
        for connection in clients.values():
            await connection.close()

    expected = {
        alice: await status_events(system, alice_token, alice_jobs),
        bob: await status_events(system, bob_token, bob_jobs),
    }
    for (notifier, user), frames in received.items():
        assert [f["position"] for f in frames] == sorted(expected[user]), (notifier, user)
        assert {f["job_id"] for f in frames} == set(jobs[user]), (notifier, user)

    # Each process took the events from its own queue and pushed them live.
    def pushed(notifier: str, user: str) -> set[str]:
        return {
            line["job_id"]
            for line in system.processes[notifier].log_lines()
            if line["event"] == "event pushed"
            and line.get("user_id") == user
            and line.get("connections", 0) >= 1
        }

    assert pushed("notifier", alice) == set(alice_jobs)
    assert pushed(SECOND, alice) == set(alice_jobs)
    assert pushed(SECOND, bob) == set(bob_jobs)


async def test_a_client_that_never_reads_is_closed_with_4008_while_the_others_get_every_event(
    system: System,
) -> None:
    user = f"slow-{uuid.uuid4().hex[:8]}"
    token = system.token(user)
    # A 4 KiB receive window and a client that reads nothing after the handshake: the
    # notifier's writes to it stop within a frame or two, and its outbox fills up.
    port = system.ports[SECOND]
    silent = await RawClient.connect(port, f"token={token}", receive_buffer=4096)
    same_process = await websockets.connect(system.websocket_url(token, 0, notifier=SECOND))
    other_process = await websockets.connect(system.websocket_url(token, 0))
    big = "x" * 100_000
    position = 10**9  # this user's events only, far above what the store has handed out
    try:
        connection = await aio_pika.connect(system.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            publisher = support.Relay(channel, Topology(system.prefix))

            async def slow_closes() -> float:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    text = (await http.get("/metrics")).text
                for line in text.splitlines():
                    if line.startswith("canvas_websocket_slow_client_closes_total "):
                        return float(line.split()[1])
                return 0.0

            # Batches the readers keep up with; the silent client falls further behind.
            # Counted from here: an earlier test on this notifier may have closed a slow
            # client of its own (a resuming client that fell behind a burst).
            closed_before = await slow_closes()
            while await slow_closes() == closed_before:
                # Kernel buffers (up to 4 MiB sent, unread) plus the outbox, with margin.
                assert position < 10**9 + 100 + 4 * SECOND_QUEUE_SIZE, "never closed as too slow"
                batch = [
                    recorded(
                        support.progressed(index, text=big), position=position + index, user_id=user
                    )
                    for index in range(1, 5)
                ]
                await publisher.publish(*batch)
                for reader in (same_process, other_process):
                    async with asyncio.timeout(15):
                        frames = [json.loads(await reader.recv()) for _ in batch]
                    assert [f["position"] for f in frames] == [e.position for e in batch]
                position += len(batch)

        code, _ = await silent.close_code(timeout=30)
        assert code == 4008
    finally:
        silent.abort()
        await same_process.close()
        await other_process.close()
