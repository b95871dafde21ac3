"""The notifier on the real RabbitMQ and PostgreSQL, with real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from uuid import uuid4

import asyncpg
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from canvas_events.auth import NOT_A_JWT, mint_token
from canvas_events.topology import Topology
from canvas_notifier.service import Notifier
from tests.notifier import support
from tests.notifier.support import (
    PING,
    SECRET,
    RawClient,
    closed_code,
    insert_events,
    insert_events_in,
    insert_job,
    live,
    live_socket,
    positions,
    receive,
    recorded,
    relay,
    running,
    settings_for,
    ws_url,
)
from tests.support import tokens
from tests.support.processes import free_port
from tests.support.proxy import proxy
from tests.support.schema import apply_orchestrator_schema
from tests.support.waiting import eventually

ALICE, BOB = "alice", "bob"


def token(user_id: str = ALICE, **kwargs) -> str:
    return mint_token(user_id, SECRET, **kwargs)


@pytest.fixture
async def schema(database_url: str) -> str:
    await apply_orchestrator_schema(database_url)
    return database_url


@pytest.fixture
async def notifier(schema: str, amqp_url: str, topology: Topology) -> AsyncIterator[Notifier]:
    async with running(settings_for(schema, amqp_url, topology)) as started:
        yield started


@pytest.fixture
async def publisher(notifier: Notifier, amqp_url: str, topology: Topology):
    async with relay(amqp_url, topology) as publishing:
        yield publishing


async def test_client_receives_its_status_frames_in_order(notifier, publisher):
    job = uuid4()
    events = [support.queued(), support.requested(), support.started(), support.progressed()]
    events += [support.succeeded(), support.completed()]
    async with live_socket(notifier, ALICE) as ws:
        await publisher.publish(
            *(
                recorded(event, position=i, user_id=ALICE, job_id=job)
                for i, event in enumerate(events, 1)
            )
        )
        frames = await receive(ws, 4)
    assert [f["type"] for f in frames] == [
        "ai_job_queued",
        "ai_generation_started",
        "ai_generation_progress",
        "ai_generation_completed",
    ]
    assert [f["position"] for f in frames] == [1, 3, 4, 6]
    assert {f["job_id"] for f in frames} == {str(job)}


async def test_a_user_never_receives_another_users_events(notifier, publisher):
    async with live_socket(notifier, ALICE) as alice, live_socket(notifier, BOB) as bob:
        await publisher.publish(
            recorded(support.queued(), position=1, user_id=ALICE),
            recorded(support.started(), position=2, user_id=ALICE),
            recorded(support.queued(), position=3, user_id=BOB),
        )
        assert await positions(alice, 2) == [1, 2]
        # Bob's first frame is his own: Alice's two were never queued for him.
        assert await positions(bob, 1) == [3]


@pytest.mark.parametrize(
    "query",
    [
        "",
        "token=",
        "token=not.a.jwt",
        f"token={mint_token(ALICE, 'another-secret-0123456789-abcdefghijklmnopqrstu')}",
        f"token={mint_token(ALICE, SECRET, ttl=timedelta(seconds=-5))}",
        f"token={tokens.unsigned(ALICE)}",
    ],
    ids=["missing", "empty", "garbage", "wrong-secret", "expired", "alg-none"],
)
async def test_a_bad_token_closes_with_4401(notifier, query):
    async with connect(ws_url(notifier, query)) as ws:
        assert await closed_code(ws) == 4401
    assert len(notifier.hub) == 0


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("", "missing token: send ?token=JWT or Authorization: Bearer JWT"),
        ("token=abcd.abcd.abcd", NOT_A_JWT),
        (
            f"token={mint_token(ALICE, 'another-secret-0123456789-abcdefghijklmnopqrstu')}",
            "invalid token: Signature verification failed",
        ),
    ],
    ids=["missing", "garbage", "wrong-secret"],
)
async def test_the_4401_close_reason_says_what_is_wrong_with_the_token(notifier, query, reason):
    async with connect(ws_url(notifier, query)) as ws:
        assert await closed_code(ws) == 4401
    assert ws.close_reason == reason
    assert "codec" not in (ws.close_reason or "")


async def test_a_bearer_header_is_accepted_too(notifier, publisher):
    headers = {"Authorization": f"Bearer {token()}"}
    async with connect(ws_url(notifier, ""), additional_headers=headers) as ws:
        await live(notifier, ALICE)
        await publisher.publish(recorded(support.queued(), position=1, user_id=ALICE))
        assert (await receive(ws, 1))[0]["type"] == "ai_job_queued"


async def test_the_tokens_expiry_ends_the_connection_with_4401(notifier):
    # exp is whole seconds: 2 s leaves at least 1 s to connect before it passes.
    short = token(ttl=timedelta(seconds=2))
    async with connect(ws_url(notifier, f"token={short}")) as ws:
        assert await closed_code(ws) == 4401
        assert ws.close_reason == "token expired"


@pytest.mark.parametrize("after", ["-1", "abc", "1.5", "9" * 30])
async def test_a_bad_after_closes_with_4400(notifier, after):
    async with connect(ws_url(notifier, f"token={token()}&after={after}")) as ws:
        assert await closed_code(ws) == 4400


async def test_after_replays_the_users_events_then_goes_live_without_gap_or_duplicate(
    notifier, publisher, schema
):
    job = uuid4()
    stored = []
    for position in range(1, 301):
        if position % 7 == 0:  # someone else's
            stored.append(recorded(support.queued(), position=position, user_id=BOB))
        elif position % 5 == 0:  # not a status event
            stored.append(recorded(support.requested(), position=position, user_id=ALICE))
        else:
            stored.append(
                recorded(support.progressed(position), position=position, user_id=ALICE, job_id=job)
            )
    await insert_events(schema, stored[:200])
    expected = [p for p in range(51, 301) if p % 7 and p % 5]

    async def record_and_relay() -> None:
        # The orchestrator commits, then its relay publishes; meanwhile the client replays.
        # Every event is also published live, the stored ones again (at-least-once).
        for envelope in stored[40:200]:
            await publisher.publish(envelope)
        for envelope in stored[200:]:
            await insert_events(schema, [envelope])
            await publisher.publish(envelope)

    async with connect(ws_url(notifier, f"token={token()}&after=50")) as ws:
        feeding = asyncio.create_task(record_and_relay())
        frames = await receive(ws, len(expected), timeout=30)
        await feeding
        # Then more live, with a duplicate of the last: it must not show up again.
        last = stored[-1]
        await publisher.publish(last, recorded(support.completed(), position=301, user_id=ALICE))
        frames += await receive(ws, 1)
    assert [f["position"] for f in frames] == [*expected, 301]


async def test_live_events_arriving_during_the_replay_are_held_and_sent_once_at_the_seam(
    notifier, publisher, schema
):
    stored = [recorded(support.progressed(p), position=p, user_id=ALICE) for p in range(1, 111)]
    await insert_events(schema, stored[:100])
    blocker = await asyncpg.connect(schema)
    try:
        # The replay's query waits on this lock, so the live events surely come first.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        async with connect(ws_url(notifier, f"token={token()}&after=50")) as ws:
            await insert_events_in(blocker, stored[100:])
            await publisher.publish(*stored[89:])  # 90..110: 90..100 are in the replay too
            await eventually(
                lambda: any(c.pending == 21 and c.holding for c in notifier.hub.clients(ALICE))
            )
            await transaction.commit()
            frames = await receive(ws, 60)
            await publisher.publish(
                stored[-1], recorded(support.completed(), position=111, user_id=ALICE)
            )
            frames += await receive(ws, 1)
    finally:
        await blocker.close()
    assert [f["position"] for f in frames] == list(range(51, 112))


async def test_a_replay_beyond_the_limit_closes_with_4009_and_the_client_resumes_from_there(
    schema, amqp_url, topology
):
    await insert_events(
        schema, [recorded(support.progressed(p), position=p, user_id=ALICE) for p in range(1, 13)]
    )
    settings = settings_for(schema, amqp_url, topology, replay_limit=5)
    received: list[int] = []
    async with running(settings) as notifier:
        after, codes = 0, []
        while len(received) < 12:
            async with connect(ws_url(notifier, f"token={token()}&after={after}")) as ws:
                with contextlib.suppress(ConnectionClosed):
                    async for raw in ws:
                        received.append(orjson.loads(raw)["position"])
                        if len(received) == 12:
                            break
                codes.append(ws.close_code)
            after = received[-1]
    assert received == list(range(1, 13))
    assert codes[:2] == [4009, 4009]


async def test_a_new_connection_is_closed_with_1013_while_the_database_is_unreachable(
    amqp_url, topology
):
    database = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    async with (
        running(settings_for(database, amqp_url, topology), wait=False) as notifier,
        connect(ws_url(notifier, f"token={token()}")) as ws,
    ):
        assert await closed_code(ws) == 1013


async def test_subscribe_narrows_the_stream_and_unsubscribe_widens_it(notifier, publisher, schema):
    job1, job2, job3 = uuid4(), uuid4(), uuid4()
    await insert_job(schema, job1, ALICE, "canvas-a")
    await insert_job(schema, job2, ALICE, "canvas-b")
    async with live_socket(notifier, ALICE) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "job_id": str(job1)}).decode())
        assert await receive(ws, 1) == [{"type": "subscribed", "job_id": str(job1)}]
        await publisher.publish(
            recorded(
                support.queued(), position=1, user_id=ALICE, job_id=job2, canvas_id="canvas-b"
            ),
            recorded(
                support.queued(), position=2, user_id=ALICE, job_id=job1, canvas_id="canvas-a"
            ),
        )
        assert await positions(ws, 1) == [2]

        await ws.send('{"type": "subscribe", "canvas_id": "canvas-b"}')
        assert await receive(ws, 1) == [{"type": "subscribed", "canvas_id": "canvas-b"}]
        await publisher.publish(
            recorded(support.started(), position=3, user_id=ALICE, job_id=job3, canvas_id="x"),
            recorded(
                support.started(), position=4, user_id=ALICE, job_id=job2, canvas_id="canvas-b"
            ),
        )
        assert await positions(ws, 1) == [4]

        await ws.send('{"type": "unsubscribe"}')
        assert await receive(ws, 1) == [{"type": "unsubscribed"}]
        await publisher.publish(
            recorded(support.completed(), position=5, user_id=ALICE, job_id=job3, canvas_id="x")
        )
        assert await positions(ws, 1) == [5]


async def test_subscribing_to_someone_elses_job_or_canvas_answers_not_found(
    schema, amqp_url, topology
):
    job = uuid4()
    await insert_job(schema, job, BOB, "canvas-of-bob")
    settings = settings_for(schema, amqp_url, topology, ws_subscribe_wait_seconds=0.2)
    async with running(settings) as notifier, connect(ws_url(notifier, f"token={token()}")) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "job_id": str(job)}).decode())
        await ws.send('{"type": "subscribe", "canvas_id": "canvas-of-bob"}')
        await ws.send(orjson.dumps({"type": "subscribe", "job_id": str(uuid4())}).decode())
        answers = await receive(ws, 3)
    assert answers[0] == {"type": "error", "detail": "job not found", "job_id": str(job)}
    assert answers[1] == {
        "type": "error",
        "detail": "canvas not found",
        "canvas_id": "canvas-of-bob",
    }
    assert answers[2]["detail"] == "job not found"


async def test_a_subscribe_right_after_the_202_waits_for_the_job_to_be_recorded(notifier, schema):
    job = uuid4()
    async with connect(ws_url(notifier, f"token={token()}")) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "job_id": str(job)}).decode())
        await insert_job(schema, job, ALICE, "canvas-late")
        assert await receive(ws, 1) == [{"type": "subscribed", "job_id": str(job)}]


async def test_an_unknown_client_message_gets_an_error_frame_and_the_connection_stays(
    notifier, publisher
):
    async with live_socket(notifier, ALICE) as ws:
        await ws.send("hello")
        await ws.send('{"type": "dance"}')
        await ws.send(b"\x00\x01")
        errors = await receive(ws, 3)
        assert [e["type"] for e in errors] == ["error"] * 3
        assert all(e["detail"] for e in errors)
        await publisher.publish(recorded(support.queued(), position=1, user_id=ALICE))
        assert await positions(ws, 1) == [1]


async def test_a_client_message_over_max_request_bytes_closes_the_connection_with_1009(
    notifier,
):
    async with live_socket(notifier, ALICE, max_size=None) as ws:
        await ws.send("x" * (notifier.settings.max_request_bytes + 1))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009  # message too big


async def test_a_client_that_never_reads_is_closed_with_4008_and_others_get_every_event(
    schema, amqp_url, topology
):
    settings = settings_for(schema, amqp_url, topology, ws_send_queue_size=8)
    big = "x" * 100_000
    async with running(settings) as notifier, relay(amqp_url, topology) as publisher:
        # A tiny receive buffer and no reading: the server's socket fills up soon.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", notifier.port))
        sock.setblocking(False)
        async with (
            connect(ws_url(notifier, f"token={token()}"), sock=sock, max_queue=1) as slow,
            connect(ws_url(notifier, f"token={token()}")) as fast,
        ):
            await live(notifier, ALICE, count=2)
            position = 0
            # Batches the fast client keeps up with; the slow one falls further behind.
            while sample(notifier, "canvas_websocket_slow_client_closes_total") == 0:
                assert position < 1_000, "the slow client was never closed"
                batch = [
                    recorded(support.progressed(i, text=big), position=i, user_id=ALICE)
                    for i in range(position + 1, position + 5)
                ]
                await publisher.publish(*batch)
                assert await positions(fast, len(batch)) == [e.position for e in batch]
                position += len(batch)
            await publisher.publish(
                recorded(support.completed(), position=position + 1, user_id=ALICE)
            )
            assert await positions(fast, 1) == [position + 1]
            assert await closed_code(slow) == 4008
            assert slow.close_reason is not None
            assert slow.close_reason.startswith("client too slow; reconnect with after=")


async def test_a_broker_reconnect_replays_what_the_new_queue_missed(notifier, publisher, schema):
    async with live_socket(notifier, ALICE) as ws:
        await publisher.publish(recorded(support.queued(), position=1, user_id=ALICE))
        assert await positions(ws, 1) == [1]
        # Recorded and relayed while this notifier's queue was gone: only the store has them.
        missed = [
            recorded(support.started(), position=2, user_id=ALICE),
            recorded(support.progressed(0), position=3, user_id=ALICE),
        ]
        await insert_events(schema, missed)
        connection = notifier.broker._connection
        assert connection is not None
        await connection.close()
        await eventually(lambda: notifier.broker.connect_count >= 2 and notifier.broker.connected)
        assert await positions(ws, 2) == [2, 3]
        await publisher.publish(missed[1], recorded(support.completed(), position=4, user_id=ALICE))
        assert await positions(ws, 1) == [4]


def sample(notifier: Notifier, name: str) -> float:
    """The value of one of ``notifier``'s metrics (0 when it has no sample)."""
    return notifier.metrics.registry.get_sample_value(name) or 0


async def test_connections_that_replayed_under_the_current_queue_do_not_replay_on_its_first_message(
    notifier, publisher
):
    # Replaying every connection at the first message after start would hold 5,000
    # connections' events behind 5,000 queries; those that connected once the queue
    # was bound cannot have missed anything.
    before = sample(notifier, "canvas_notifier_resyncs_total")
    async with (
        live_socket(notifier, ALICE) as alice,
        live_socket(notifier, BOB, "&after=0") as bob,
    ):
        await publisher.publish(
            recorded(support.queued(), position=1, user_id=ALICE),
            recorded(support.queued(), position=2, user_id=BOB),
        )
        assert await positions(alice, 1) == [1]
        assert await positions(bob, 1) == [2]
    assert sample(notifier, "canvas_notifier_resyncs_total") == before


async def test_a_client_that_never_answers_a_ping_is_closed_with_1011_and_one_that_answers_stays(
    schema, amqp_url, topology
):
    settings = settings_for(
        schema, amqp_url, topology, ws_ping_interval_seconds=0.2, ws_ping_timeout_seconds=0.5
    )
    async with (
        running(settings) as notifier,
        relay(amqp_url, topology) as publisher,
        live_socket(notifier, ALICE) as answering,
    ):
        # Reads every frame, pings included, and never sends a pong.
        silent = await RawClient.connect(notifier.port, f"token={token()}")
        try:
            code, before_close = await silent.close_code()
        finally:
            silent.abort()
        assert code == 1011
        assert PING in before_close
        # The websockets client answered the same pings all along: still served.
        await eventually(lambda: len(notifier.hub) == 1)
        await publisher.publish(recorded(support.queued(), position=1, user_id=ALICE))
        assert await positions(answering, 1) == [1]


async def test_a_resync_waits_out_a_database_outage_and_then_replays_what_the_dropped_queue_missed(
    schema, amqp_url, topology
):
    async with (
        proxy(schema) as database,
        proxy(amqp_url) as broker,
    ):
        settings = settings_for(database.url(schema), broker.url(amqp_url), topology)
        async with (
            running(settings) as notifier,
            relay(amqp_url, topology) as publisher,
            live_socket(notifier, ALICE) as ws,
        ):
            await publisher.publish(recorded(support.queued(), position=1, user_id=ALICE))
            assert await positions(ws, 1) == [1]

            database.cut()
            # The broker connection dies (no goodbye): the notifier's queue goes with it,
            # and what is relayed meanwhile only the store has.
            broker.cut()
            missed = [
                recorded(support.started(), position=2, user_id=ALICE),
                recorded(support.progressed(0), position=3, user_id=ALICE),
            ]
            await insert_events(schema, missed)
            broker.restore()
            await eventually(
                lambda: notifier.broker.connect_count >= 2 and notifier.broker.connected
            )
            # The replay cannot read the store: the next live event waits behind it.
            await publisher.publish(recorded(support.completed(), position=4, user_id=ALICE))

            def waiting() -> bool:
                return any(c.holding and c.pending == 1 for c in notifier.hub.clients(ALICE))

            await eventually(waiting)
            # The replay really meets the outage, retries, and holds on meanwhile.
            await eventually(lambda: database.refused >= 2)
            assert waiting()

            database.restore()
            assert await positions(ws, 3, timeout=30) == [2, 3, 4]
            await publisher.publish(
                missed[1], recorded(support.cancelled(), position=5, user_id=ALICE)
            )
            assert await positions(ws, 1) == [5]


async def test_health_ready_metrics_and_unknown_paths(notifier):
    base = f"http://127.0.0.1:{notifier.port}"
    async with (
        httpx.AsyncClient(base_url=base) as http,
        live_socket(notifier, ALICE),
    ):
        health = await http.get("/health")
        ready = await http.get("/ready")
        metrics = await http.get("/metrics")
        missing = await http.get("/nope")
    assert health.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "canvas_websocket_connections",
        "canvas_websocket_messages_sent_total",
        "canvas_websocket_slow_client_closes_total",
        "canvas_notifier_replayed_events_total",
    ):
        assert name in metrics.text
    assert missing.status_code == 404


async def test_ready_is_503_and_health_200_while_the_broker_is_unreachable(schema, topology):
    closed = free_port()
    settings = settings_for(schema, f"amqp://guest:guest@127.0.0.1:{closed}/", topology)
    async with running(settings, wait=False) as notifier:
        await notifier.database.wait_ready(10)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{notifier.port}") as http:
            health = await http.get("/health")
            ready = await http.get("/ready")
    assert health.status_code == 200
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("broker:")
    assert body["detail"] == body["checks"]["broker"]  # the failing reasons, in one line
