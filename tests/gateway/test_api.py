"""The gateway over real HTTP, against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.envelope import Envelope
from canvas_events.topology import Topology
from tests.gateway.conftest import JWT_SECRET, Gateway, gateway_settings, running_gateway, token
from tests.support.processes import free_port
from tests.support.schema import apply_orchestrator_schema
from tests.support.waiting import eventually

Take = Callable[[], Awaitable[tuple[str, Envelope]]]


async def test_202_only_with_job_requested_on_the_orchestrator_queue(
    gateway: Gateway, orchestrator_queue: Take
) -> None:
    response = await gateway.create(
        canvas_id="board-1",
        priority=7,
        options={"style": "minimal"},
        headers={"X-Request-ID": "req-abc-1"},
    )
    assert response.status_code == 202, response.text
    assert response.headers["X-Request-ID"] == "req-abc-1"
    body = response.json()
    job_id = body["job_id"]
    assert body == {
        "job_id": job_id,
        "status": "queued",
        "canvas_id": "board-1",
        "status_url": f"/api/ai-agent/job/{job_id}/status",
        "events_url": f"/api/ai-agent/job/{job_id}/events",
    }
    key, envelope = await orchestrator_queue()
    assert key == "gateway.JobRequested"
    assert envelope.type == "JobRequested"
    assert str(envelope.job_id) == job_id
    assert envelope.user_id == "alice"
    assert envelope.canvas_id == "board-1"
    assert envelope.correlation_id == "req-abc-1"
    assert envelope.data == {
        "query": "a flowchart of a login process",
        "canvas_id": "board-1",
        "priority": 7,
        "options": {"style": "minimal"},
        "idempotency_key": None,
    }
    [ledger] = await gateway.sql("SELECT * FROM gateway_job_requests")
    assert ledger["confirmed_at"] is not None
    assert envelope.occurred_at == ledger["created_at"]


async def test_canvas_id_defaults_to_a_new_uuid(gateway: Gateway, orchestrator_queue: Take) -> None:
    response = await gateway.create()
    assert response.status_code == 202
    canvas_id = response.json()["canvas_id"]
    assert uuid.UUID(canvas_id).version == 4
    _, envelope = await orchestrator_queue()
    assert envelope.canvas_id == canvas_id


async def test_status_right_after_202_answers_queued_from_the_ledger(gateway: Gateway) -> None:
    accepted = (await gateway.create(priority=3)).json()
    job_id = accepted["job_id"]
    status = await gateway.client.get(f"/api/ai-agent/job/{job_id}/status", headers=token("alice"))
    assert status.status_code == 200
    body = status.json()
    assert body["id"] == job_id
    assert body["status"] == "queued"
    assert body["canvas_id"] == accepted["canvas_id"]
    assert body["priority"] == 3
    assert body["retry_count"] == 0
    assert body["result"] is None and body["started_at"] is None
    events = await gateway.client.get(f"/api/ai-agent/job/{job_id}/events", headers=token("alice"))
    assert events.json() == {"job_id": job_id, "events": []}
    listed = await gateway.client.get("/api/ai-agent/jobs", headers=token("alice"))
    assert [job["id"] for job in listed.json()["jobs"]] == [job_id]


async def test_status_of_a_projected_job_comes_from_the_read_model(gateway: Gateway) -> None:
    result = {
        "object_count": 1,
        "object_ids": ["o1"],
        "dropped_objects": 0,
        "model": "m",
        "usage": {},
        "latency_ms": 5,
    }
    job_id = await gateway.insert_job(
        "alice", status="completed", completed_at=datetime.now(UTC), result=result
    )
    response = await gateway.client.get(
        f"/api/ai-agent/job/{job_id}/status", headers=token("alice")
    )
    assert response.status_code == 200
    assert response.json()["status"] == "completed"
    assert response.json()["result"] == result


async def test_events_come_in_version_order(gateway: Gateway) -> None:
    job_id = await gateway.insert_job("alice")
    now = datetime.now(UTC)
    for version, kind in ((2, "JobQueued"), (1, "JobRequested")):
        await gateway.sql(
            "INSERT INTO events (stream_id, version, event_id, type, schema_version, occurred_at,"
            " correlation_id, user_id, canvas_id, data) VALUES ($1, $2, $3, $4, 1, $5, 'c',"
            " 'alice', 'cv', $6::jsonb)",
            job_id,
            version,
            uuid.uuid4(),
            kind,
            now,
            orjson.dumps({"v": version}).decode(),
        )
    response = await gateway.client.get(
        f"/api/ai-agent/job/{job_id}/events", headers=token("alice")
    )
    events = response.json()["events"]
    assert [(e["type"], e["version"], e["data"]) for e in events] == [
        ("JobRequested", 1, {"v": 1}),
        ("JobQueued", 2, {"v": 2}),
    ]
    assert events[0]["position"] > events[1]["position"]  # inserted in reverse
    other = await gateway.client.get(f"/api/ai-agent/job/{job_id}/events", headers=token("bob"))
    assert other.status_code == 404


async def test_same_idempotency_key_yields_one_job(gateway: Gateway) -> None:
    key = {"Idempotency-Key": "order-17"}
    first = await gateway.create(headers=key, canvas_id="c-1")
    again = await gateway.create(headers=key, canvas_id="c-2", query="something else")
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()  # the first request's job and canvas
    burst = await asyncio.gather(
        *(gateway.create(headers={"Idempotency-Key": "burst"}) for _ in range(10))
    )
    assert {response.status_code for response in burst} == {202}
    assert len({response.json()["job_id"] for response in burst}) == 1
    rows = await gateway.sql(
        "SELECT idempotency_key, count(*) AS n FROM gateway_job_requests GROUP BY 1 ORDER BY 1"
    )
    assert [(row["idempotency_key"], row["n"]) for row in rows] == [("burst", 1), ("order-17", 1)]
    bob = await gateway.create("bob", headers=key)
    assert bob.json()["job_id"] != first.json()["job_id"]
    metrics = (await gateway.client.get("/metrics")).text
    assert "canvas_jobs_accepted_total 3.0" in metrics


async def test_broker_unreachable_answers_503_and_ready_503(
    database_url: str, topology: Topology
) -> None:
    await apply_orchestrator_schema(database_url)
    settings = gateway_settings(
        database_url, f"amqp://guest:guest@127.0.0.1:{free_port()}/", topology
    )
    async with running_gateway(settings, database_url, wait_ready=False) as gateway:

        async def database_up() -> Any:
            ready = await gateway.client.get("/ready")
            return ready if ready.json()["checks"]["database"] == "ok" else None

        ready = await eventually(database_up, what="the database check to pass")
        assert ready.status_code == 503
        assert ready.json()["checks"]["broker"].startswith("broker:")
        response = await gateway.create()
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert "nothing was queued" in response.json()["detail"]
        assert await gateway.sql("SELECT * FROM gateway_job_requests") == []
        health = await gateway.client.get("/api/ai-agent/health")
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy"
        metrics = (await gateway.client.get("/metrics")).text
        assert "canvas_publish_failures_total 1.0" in metrics


async def test_user_over_the_limit_gets_429_until_a_job_finishes(
    make_gateway: Callable[..., Any],
) -> None:
    async with make_gateway(max_active_jobs_per_user=2) as gateway:
        first = await gateway.create()
        assert (await gateway.create()).status_code == 202
        refused = await gateway.create()
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) > 0
        assert "too many unfinished jobs (2, limit 2)" in refused.json()["detail"]
        assert (await gateway.create("bob")).status_code == 202  # per user
        # The orchestrator projected the first job as completed: a slot is free again.
        await gateway.insert_job("alice", id=uuid.UUID(first.json()["job_id"]), status="completed")
        assert (await gateway.create()).status_code == 202


async def test_another_users_job_answers_404_like_a_missing_one(gateway: Gateway) -> None:
    job_id = (await gateway.create()).json()["job_id"]
    missing = uuid.uuid4()
    for path in ("status", "events"):
        theirs = await gateway.client.get(
            f"/api/ai-agent/job/{job_id}/{path}", headers=token("bob")
        )
        nobodys = await gateway.client.get(
            f"/api/ai-agent/job/{missing}/{path}", headers=token("bob")
        )
        assert theirs.status_code == nobodys.status_code == 404
        assert theirs.json() == nobodys.json() == {"detail": "job not found"}
    cancel = await gateway.client.post(f"/api/ai-agent/job/{job_id}/cancel", headers=token("bob"))
    assert cancel.status_code == 404
    assert (await gateway.client.get("/api/ai-agent/jobs", headers=token("bob"))).json() == {
        "jobs": [],
        "next_cursor": None,
    }


async def test_cancel_of_a_final_job_answers_409(gateway: Gateway) -> None:
    job_id = await gateway.insert_job("alice", status="completed")
    response = await gateway.client.post(
        f"/api/ai-agent/job/{job_id}/cancel", headers=token("alice")
    )
    assert response.status_code == 409
    assert response.json() == {"detail": "job is already completed"}


async def test_cancel_of_a_queued_job_publishes_job_cancel_requested(
    gateway: Gateway, orchestrator_queue: Take
) -> None:
    job_id = (await gateway.create()).json()["job_id"]
    await orchestrator_queue()  # the JobRequested
    response = await gateway.client.post(
        f"/api/ai-agent/job/{job_id}/cancel", headers={**token("alice"), "X-Request-ID": "c-9"}
    )
    assert response.status_code == 202
    assert response.json() == {"job_id": job_id, "status": "cancelling"}
    key, envelope = await orchestrator_queue()
    assert key == "gateway.JobCancelRequested"
    assert (str(envelope.job_id), envelope.user_id, envelope.correlation_id) == (
        job_id,
        "alice",
        "c-9",
    )
    # Written down before the 202, where the orchestrator looks before it records more.
    [request] = await gateway.sql("SELECT envelope FROM cancel_requests")
    assert orjson.loads(request["envelope"])["event_id"] == str(envelope.event_id)


async def test_a_cancel_that_waits_for_a_result_being_recorded_answers_by_its_outcome(
    gateway: Gateway,
) -> None:
    job_id = await gateway.insert_job("alice", status="processing")
    conn = await asyncpg.connect(gateway.database_url)
    try:
        # The orchestrator holds the job's row while it records the job's result.
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            cancel = asyncio.create_task(
                gateway.client.post(f"/api/ai-agent/job/{job_id}/cancel", headers=token("alice"))
            )
            await asyncio.sleep(0.3)
            assert not cancel.done()  # the cancel waits for the result to commit
            await conn.execute("UPDATE jobs SET status = 'completed' WHERE id = $1", job_id)
        response = await cancel
    finally:
        await conn.close()
    assert response.status_code == 409, response.text
    assert response.json() == {"detail": "job is already completed"}
    assert await gateway.sql("SELECT * FROM cancel_requests") == []


async def test_canvas_objects_of_another_user_answer_404(gateway: Gateway) -> None:
    now = datetime.now(UTC)
    await gateway.sql("INSERT INTO canvases VALUES ('bobs-board', 'bob', $1)", now)
    job_a, job_b = sorted([uuid.uuid4(), uuid.uuid4()])
    objects = [
        ("o3", job_b, 0, {"type": "circle", "x": 1, "y": 2, "radius": 3}, now),
        ("o2", job_a, 1, {"type": "text", "x": 0, "y": 0, "text": "b"}, now),
        ("o1", job_a, 0, {"type": "text", "x": 0, "y": 0, "text": "a"}, now),
        ("o0", job_b, 1, {"type": "text", "x": 0, "y": 0, "text": "old"}, now - timedelta(1)),
    ]
    for object_id, job_id, index, obj, created in objects:
        await gateway.sql(
            "INSERT INTO canvas_objects VALUES ($1, 'bobs-board', $2, 'bob', $3, $4::jsonb, $5)",
            object_id,
            job_id,
            index,
            orjson.dumps(obj).decode(),
            created,
        )
    mine = await gateway.client.get("/api/canvas/bobs-board/objects", headers=token("bob"))
    assert mine.status_code == 200
    body = mine.json()
    assert [o["id"] for o in body["objects"]] == ["o0", "o1", "o2", "o3"]
    assert body["objects"][3] == {
        "id": "o3",
        "job_id": str(job_b),
        "type": "circle",
        "x": 1,
        "y": 2,
        "radius": 3,
    }
    theirs = await gateway.client.get("/api/canvas/bobs-board/objects", headers=token("alice"))
    unknown = await gateway.client.get("/api/canvas/nobody/objects", headers=token("alice"))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()
    # Drawing on someone else's canvas is refused the same way.
    assert (await gateway.create(canvas_id="bobs-board")).status_code == 404


async def test_canvas_with_only_a_pending_job_has_no_objects_yet(gateway: Gateway) -> None:
    await gateway.create(canvas_id="fresh")
    response = await gateway.client.get("/api/canvas/fresh/objects", headers=token("alice"))
    assert response.json() == {"canvas_id": "fresh", "objects": []}
    other = await gateway.client.get("/api/canvas/fresh/objects", headers=token("bob"))
    assert other.status_code == 404
    assert (await gateway.create("bob", canvas_id="fresh")).status_code == 404


async def test_jobs_list_pages_newest_first_with_a_cursor(gateway: Gateway) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    ids = [
        await gateway.insert_job(
            "alice",
            created_at=base + timedelta(minutes=i),
            status="failed" if i % 2 else "completed",
        )
        for i in range(5)
    ]
    await gateway.insert_job("bob")
    pending = (await gateway.create()).json()["job_id"]  # newest, not projected yet
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (
            await gateway.client.get("/api/ai-agent/jobs", params=params, headers=token("alice"))
        ).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [pending, *[str(i) for i in reversed(ids)]]
    failed = await gateway.client.get(
        "/api/ai-agent/jobs", params={"status": "failed"}, headers=token("alice")
    )
    assert [job["id"] for job in failed.json()["jobs"]] == [str(ids[3]), str(ids[1])]


async def test_debug_environment_is_for_admins_and_shows_no_secret(gateway: Gateway) -> None:
    await gateway.create()
    refused = await gateway.client.get("/api/ai-agent/debug/environment", headers=token("alice"))
    assert refused.status_code == 403
    admin = token("root", admin=True)
    response = await gateway.client.get("/api/ai-agent/debug/environment", headers=admin)
    assert response.status_code == 200
    body = response.json()
    topology = gateway.settings.topology
    names = {queue["name"] for queue in body["queues"]}
    assert {topology.orchestrator.name, *topology.dead_letter_queues} <= names
    [orchestrator] = [q for q in body["queues"] if q["name"] == topology.orchestrator.name]
    assert orchestrator["messages"] == 1
    assert body["jobs"]["recent"] == []  # nothing projected yet
    text = response.text
    for secret in (JWT_SECRET, admin["Authorization"].split()[1], "guest:guest", "password"):
        assert secret not in text


async def test_system_health_is_degraded_without_consumers(gateway: Gateway) -> None:
    response = await gateway.client.get("/api/ai-agent/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert (body["database"], body["broker"]) == ("ok", "ok")
    assert body["job_processor"] == {
        "work_queue": gateway.settings.topology.generator_work.name,
        "queued_messages": 0,
        "generator_consumers": 0,
        "orchestrator_consumers": 0,
        "oldest_queued_age_seconds": None,
        "outbox_lag": 0,
        "oldest_unpublished_age_seconds": None,
    }


async def _hold(message: AbstractIncomingMessage) -> None:
    """A consumer that takes nothing (none arrives in this test)."""


async def test_system_health_is_degraded_while_a_dead_letter_queue_holds_messages(
    gateway: Gateway, amqp_url: str
) -> None:
    topology = gateway.settings.topology
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        # A consumer on each shared queue, so that the dead letters are the only issue.
        for spec in (topology.generator_work, topology.orchestrator):
            queue = await channel.declare_queue(spec.name, passive=True)
            await queue.consume(_hold)
        body = (await gateway.client.get("/api/ai-agent/health")).json()
        assert (body["status"], body["issues"]) == ("healthy", [])

        dlq = topology.orchestrator.dead_letter_queue
        for _ in range(2):
            await channel.default_exchange.publish(aio_pika.Message(b"not an envelope"), dlq)

        response = await gateway.client.get("/api/ai-agent/health")
        assert response.status_code == 200  # degraded, not unhealthy: jobs still flow
        body = response.json()
        assert body["status"] == "degraded"
        assert body["issues"] == [f"dead letters wait in {dlq}: 2 message(s)"]

        await (await channel.declare_queue(dlq, passive=True)).purge()
        body = (await gateway.client.get("/api/ai-agent/health")).json()
        assert (body["status"], body["issues"]) == ("healthy", [])


async def test_reads_answer_503_until_the_orchestrator_created_its_tables(
    database_url: str, amqp_url: str, topology: Topology
) -> None:
    settings = gateway_settings(database_url, amqp_url, topology)
    async with running_gateway(settings, database_url) as gateway:
        status = await gateway.client.get(
            f"/api/ai-agent/job/{uuid.uuid4()}/status", headers=token("alice")
        )
        assert status.status_code == 503
        assert status.json()["detail"].startswith("not ready")
        assert (await gateway.create()).status_code == 503


async def test_metrics_count_requests_by_route_template(gateway: Gateway) -> None:
    await gateway.client.get(f"/api/ai-agent/job/{uuid.uuid4()}/status", headers=token("a"))
    text = (await gateway.client.get("/metrics")).text
    assert (
        'canvas_http_requests_total{method="GET",route="/api/ai-agent/job/{job_id}/status",'
        'status="404"} 1.0'
    ) in text
    assert 'canvas_http_request_seconds_bucket{le="0.005",route="/api/ai-agent/job' in text
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert names and all(name.startswith("canvas_") for name in names)
