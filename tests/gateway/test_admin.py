"""Run a final job again, and the operators' view of every user's jobs, over real HTTP
against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from canvas_events.envelope import Envelope
from tests.gateway.conftest import Gateway, token

Take = Callable[[], Awaitable[tuple[str, Envelope]]]


async def _status(gateway: Gateway, job_id: Any, user: str = "alice") -> dict[str, Any]:
    response = await gateway.client.get(f"/api/ai-agent/job/{job_id}/status", headers=token(user))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _retry(
    gateway: Gateway,
    job_id: Any,
    user: str = "alice",
    *,
    admin: bool = False,
    headers: dict[str, str] | None = None,
) -> Any:
    return await gateway.client.post(
        f"/api/ai-agent/job/{job_id}/retry", headers={**token(user, admin=admin), **(headers or {})}
    )


async def test_the_status_answer_carries_the_query_pending_and_projected(
    gateway: Gateway,
) -> None:
    accepted = (await gateway.create(query="  a login flow  ")).json()
    pending = await _status(gateway, accepted["job_id"])
    assert pending["query"] == "a login flow"
    assert pending["retry_of"] is None
    projected = await gateway.insert_job("alice", query="a kanban board")
    assert (await _status(gateway, projected))["query"] == "a kanban board"
    listed = await gateway.client.get("/api/ai-agent/jobs", headers=token("alice"))
    assert {job["query"] for job in listed.json()["jobs"]} == {"a login flow", "a kanban board"}
    assert all("user_id" not in job for job in listed.json()["jobs"])


async def test_retry_runs_a_failed_job_again_as_a_linked_new_job(
    gateway: Gateway, orchestrator_queue: Take
) -> None:
    failed = await gateway.insert_job(
        "alice",
        status="failed",
        query="a flowchart",
        canvas_id="board-7",
        priority=8,
        options='{"style": "minimal"}',
        completed_at=datetime.now(UTC),
        error_message="model refused",
    )
    response = await _retry(gateway, failed, headers={"X-Request-ID": "retry-req-1"})
    assert response.status_code == 202, response.text
    body = response.json()
    new_id = body["job_id"]
    assert new_id != str(failed)
    assert body == {
        "job_id": new_id,
        "status": "queued",
        "canvas_id": "board-7",
        "status_url": f"/api/ai-agent/job/{new_id}/status",
        "events_url": f"/api/ai-agent/job/{new_id}/events",
        "retry_of": str(failed),
    }
    _, envelope = await orchestrator_queue()
    assert envelope.type == "JobRequested"
    assert str(envelope.job_id) == new_id
    assert envelope.correlation_id == "retry-req-1"
    assert envelope.data == {
        "query": "a flowchart",
        "canvas_id": "board-7",
        "priority": 8,
        "options": {"style": "minimal"},
        "idempotency_key": None,
        "retry_of": str(failed),
    }
    status = await _status(gateway, new_id)
    assert (status["status"], status["retry_of"], status["query"]) == (
        "queued",
        str(failed),
        "a flowchart",
    )


async def test_retry_of_a_job_still_running_answers_409_and_queues_nothing(
    gateway: Gateway,
) -> None:
    for status in ("queued", "processing", "retry_scheduled"):
        job_id = await gateway.insert_job("alice", status=status)
        response = await _retry(gateway, job_id)
        assert response.status_code == 409, response.text
        assert status in response.json()["detail"]
    pending = (await gateway.create()).json()["job_id"]  # not recorded yet: queued
    assert (await _retry(gateway, pending)).status_code == 409
    assert len(await gateway.sql("SELECT 1 FROM gateway_job_requests")) == 1


async def test_retry_of_another_users_job_answers_404_unless_an_admin_asks(
    gateway: Gateway,
) -> None:
    failed = await gateway.insert_job("alice", status="cancelled", canvas_id="alices-board")
    assert (await _retry(gateway, failed, "bob")).status_code == 404
    assert (await _retry(gateway, uuid.uuid4(), "bob", admin=True)).status_code == 404
    response = await _retry(gateway, failed, "ops", admin=True)
    assert response.status_code == 202, response.text
    new_id = response.json()["job_id"]
    # The new job is the owner's, on the owner's canvas: the admin only asked for it.
    assert (await _status(gateway, new_id, "alice"))["retry_of"] == str(failed)
    owned = await gateway.client.get(f"/api/ai-agent/job/{new_id}/status", headers=token("ops"))
    assert owned.status_code == 404


async def test_a_keyed_retry_is_answered_with_the_same_job_and_never_meets_a_create(
    gateway: Gateway,
) -> None:
    done = await gateway.insert_job("alice", status="completed", completed_at=datetime.now(UTC))
    first = await _retry(gateway, done, headers={"Idempotency-Key": "k-1"})
    again = await _retry(gateway, done, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    created = await gateway.create(headers={"Idempotency-Key": "k-1"})
    assert created.json()["job_id"] != first.json()["job_id"]
    by_admin = await _retry(gateway, done, "ops", admin=True, headers={"Idempotency-Key": "k-1"})
    assert by_admin.json()["job_id"] not in (first.json()["job_id"], created.json()["job_id"])
    assert len(await gateway.sql("SELECT 1 FROM gateway_job_requests")) == 3


async def test_a_retry_counts_towards_the_owners_limit(make_gateway: Any) -> None:
    async with make_gateway(max_active_jobs_per_user=1) as gateway:
        failed = await gateway.insert_job("alice", status="failed")
        await gateway.insert_job("alice", status="processing")
        response = await _retry(gateway, failed, "ops", admin=True)
        assert response.status_code == 429, response.text
        assert response.headers["Retry-After"]


# -- the operators' list ---------------------------------------------------------------


async def _admin_jobs(gateway: Gateway, **params: Any) -> dict[str, Any]:
    response = await gateway.client.get(
        "/api/admin/jobs", params=params, headers=token("ops", admin=True)
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_admin_endpoints_answer_403_to_everyone_else(gateway: Gateway) -> None:
    job_id = await gateway.insert_job("alice")
    for path in ("/api/admin/jobs", f"/api/admin/jobs/{job_id}/events"):
        assert (await gateway.client.get(path, headers=token("alice"))).status_code == 403
        assert (await gateway.client.get(path)).status_code == 401


async def test_admin_list_shows_every_users_jobs_filtered(gateway: Gateway) -> None:
    now = datetime.now(UTC)
    old = await gateway.insert_job(
        "alice", status="failed", query="a LOGIN flow", created_at=now - timedelta(days=2)
    )
    failed = await gateway.insert_job("bob", status="failed", query="the login page")
    done = await gateway.insert_job("bob", status="completed", query="a kanban board")
    odd = await gateway.insert_job("carol", status="completed", query="100%_done")
    pending = (await gateway.create("dave", query="login screen")).json()["job_id"]

    everything = await _admin_jobs(gateway)
    assert [job["id"] for job in everything["jobs"]] == [
        pending,
        str(odd),
        str(done),
        str(failed),
        str(old),
    ]
    assert everything["jobs"][0]["user_id"] == "dave"
    assert everything["jobs"][0]["query"] == "login screen"
    assert everything["next_cursor"] is None

    def ids(body: dict[str, Any]) -> set[str]:
        return {job["id"] for job in body["jobs"]}

    assert ids(await _admin_jobs(gateway, q="login")) == {pending, str(failed), str(old)}
    assert ids(await _admin_jobs(gateway, q="login", status="failed")) == {str(failed), str(old)}
    assert ids(await _admin_jobs(gateway, user_id="bob")) == {str(failed), str(done)}
    since = (now - timedelta(hours=1)).isoformat()
    assert str(old) not in ids(await _admin_jobs(gateway, since=since))
    assert ids(await _admin_jobs(gateway, user_id="dave", status="queued")) == {pending}
    # The text is taken literally: % and _ are not wildcards.
    assert ids(await _admin_jobs(gateway, q="%_")) == {str(odd)}
    assert ids(await _admin_jobs(gateway, q="0%_d")) == {str(odd)}
    assert ids(await _admin_jobs(gateway, q="a_l")) == set()


async def test_admin_list_pages_with_a_cursor(gateway: Gateway) -> None:
    start = datetime.now(UTC)
    made = [
        await gateway.insert_job(f"user-{n % 3}", created_at=start + timedelta(seconds=n))
        for n in range(7)
    ]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = await _admin_jobs(gateway, **params)
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [str(job_id) for job_id in reversed(made)]


async def test_admin_list_refuses_bad_filters(gateway: Gateway) -> None:
    admin = token("ops", admin=True)
    for params in (
        {"status": "lost"},
        {"since": "yesterday"},
        {"since": "2026-01-01T00:00:00"},
        {"limit": 0},
        {"cursor": "not-a-cursor"},
        {"q": ""},
        {"q": "nul\x00"},
        {"user_id": "a\x00b"},
    ):
        response = await gateway.client.get("/api/admin/jobs", params=params, headers=admin)
        assert response.status_code == 422, (params, response.text)


async def test_admin_reads_any_jobs_events(gateway: Gateway) -> None:
    job_id = await gateway.insert_job("alice")
    await gateway.sql(
        "INSERT INTO events (stream_id, version, event_id, type, schema_version, occurred_at,"
        " correlation_id, user_id, canvas_id, data) VALUES ($1, 1, $2, 'JobRequested', 1,"
        " now(), 'c', 'alice', 'cv', '{}'::jsonb)",
        job_id,
        uuid.uuid4(),
    )
    response = await gateway.client.get(
        f"/api/admin/jobs/{job_id}/events", headers=token("ops", admin=True)
    )
    assert response.status_code == 200, response.text
    assert [event["type"] for event in response.json()["events"]] == ["JobRequested"]
    missing = await gateway.client.get(
        f"/api/admin/jobs/{uuid.uuid4()}/events", headers=token("ops", admin=True)
    )
    assert missing.status_code == 404


async def test_a_queued_job_whose_call_waits_for_the_model_budget_says_so(
    gateway: Gateway,
) -> None:
    attempt = uuid.uuid4()
    waiting = await gateway.insert_job("alice", status="queued", attempt_id=attempt)
    running = await gateway.insert_job("alice", status="processing", attempt_id=uuid.uuid4())
    stale = await gateway.insert_job("alice", status="queued", attempt_id=uuid.uuid4())
    for job_id, asked in ((waiting, "now()"), (stale, "now() - interval '5 minutes'")):
        await gateway.sql(
            "INSERT INTO model_waits (attempt_id, model, reason, asked_at) "
            f"SELECT attempt_id, 'm', 'requests', {asked} FROM jobs WHERE id = $1",
            job_id,
        )
    assert (await _status(gateway, waiting))["waiting_for"] == "model capacity"
    assert (await _status(gateway, running))["waiting_for"] is None
    # A wait nobody asked about lately (its generator went away) is not shown.
    assert (await _status(gateway, stale))["waiting_for"] is None
    listed = await _admin_jobs(gateway, status="queued")
    assert {job["id"]: job["waiting_for"] for job in listed["jobs"]} == {
        str(waiting): "model capacity",
        str(stale): None,
    }
