"""The orchestrator's HTTP endpoints: health, readiness, metrics, the internal read API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import httpx
import pytest

from canvas_events.auth import mint_token
from canvas_orchestrator.service import Service
from tests.orchestrator.harness import JWT_SECRET, Bus, service_headers, settings_for, wait_status


def client(service: Service, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """A client of the service's HTTP app; with the service credential by default."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app()),
        base_url="http://orchestrator",
        headers=service_headers() if headers is None else headers,
    )


@pytest.fixture
async def unreachable(topology) -> AsyncIterator[Service]:
    """An orchestrator whose database and broker do not answer."""
    settings = settings_for(
        "postgresql://postgres@127.0.0.1:1/nowhere", "amqp://guest:guest@127.0.0.1:1/", topology
    )
    service = Service(settings)
    await service.start()
    yield service
    await service.stop()


async def test_health_is_200_and_ready_is_503_with_reasons_while_nothing_answers(unreachable):
    async with client(unreachable) as http:
        health = await http.get("/health")
        ready = await http.get("/ready")
        job = await http.get(f"/internal/jobs/{uuid4()}")

    assert health.status_code == 200
    assert ready.status_code == 503
    body = ready.json()
    checks = body["checks"]
    assert checks["database"] != "ok"
    assert checks["broker"] != "ok"
    # The shape every service answers /ready with (canvas_events.ops.Probes).
    assert body["status"] == "not ready"
    assert body["detail"] == f"{checks['database']}; {checks['broker']}"
    assert job.status_code == 503


async def test_ready_is_200_when_the_database_and_broker_are_up(start):
    service = await start()

    async with client(service) as http:
        ready = await http.get("/ready")

    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


async def test_metrics_are_prometheus_text_and_every_name_starts_with_canvas(start, bus: Bus):
    service = await start()
    request = await bus.request()
    assert request.job_id is not None
    await wait_status(service, request.job_id, "queued")

    async with client(service) as http:
        response = await http.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = [line for line in response.text.splitlines() if line and not line.startswith("#")]
    assert samples
    assert all(line.startswith("canvas_") for line in samples)
    assert 'canvas_jobs_total{status="queued"} 1.0' in samples
    for name in (
        "canvas_outbox_lag_events",
        "canvas_attempt_duration_seconds",
        "canvas_orchestrator_messages_total",
        "canvas_queue_depth",
    ):
        assert name in response.text
    # No generator runs here: the queued job is the oldest, and it has waited a moment.
    age = next(line for line in samples if line.startswith("canvas_queue_oldest_age_seconds"))
    assert float(age.split()[-1]) > 0
    # Whose the unfinished work is: the one user with a job.
    assert f'canvas_unfinished_jobs_top_users{{user="{request.user_id}"}} 1.0' in samples


async def test_internal_api_serves_a_job_row_and_its_stream(start, bus: Bus):
    service = await start()
    request = await bus.request(priority=3)
    job_id = request.job_id
    assert job_id is not None
    await wait_status(service, job_id, "queued")

    async with client(service) as http:
        job = await http.get(f"/internal/jobs/{job_id}")
        events = await http.get(f"/internal/jobs/{job_id}/events")
        missing = await http.get(f"/internal/jobs/{uuid4()}")
        missing_events = await http.get(f"/internal/jobs/{uuid4()}/events")

    assert job.status_code == 200
    body = job.json()
    assert body["id"] == str(job_id)
    assert body["status"] == "queued"
    assert body["user_id"] == "alice"
    assert body["priority"] == 3
    assert body["canvas_id"] == request.canvas_id
    assert events.status_code == 200
    stream = events.json()
    assert stream["job_id"] == str(job_id)
    assert [event["type"] for event in stream["events"]] == [
        "JobRequested",
        "JobQueued",
        "GenerationRequested",
    ]
    assert [event["version"] for event in stream["events"]] == [1, 2, 3]
    assert stream["events"][0]["data"]["query"] == request.data["query"]
    assert missing.status_code == 404
    assert missing.json() == {"detail": "job not found"}
    assert missing_events.status_code == 404


@pytest.mark.parametrize(
    ("who", "status", "detail"),
    [
        ("nobody", 401, "service credential required"),
        ("a user", 403, "service credential required"),
        ("an admin", 403, "service credential required"),
        ("another secret", 401, "invalid token: Signature verification failed"),
    ],
)
async def test_internal_api_answers_only_the_systems_own_services(
    start, bus: Bus, who: str, status: int, detail: str
):
    service = await start()
    request = await bus.request()
    job_id = request.job_id
    assert job_id is not None
    await wait_status(service, job_id, "queued")
    tokens = {
        "nobody": None,
        "a user": mint_token("alice", JWT_SECRET),
        "an admin": mint_token("root", JWT_SECRET, admin=True),
        "another secret": mint_token("svc", "x" * 40, roles=("service",)),
    }
    token = tokens[who]
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async with client(service, headers) as http:
        answers = [
            await http.get(path)
            for path in (
                f"/internal/jobs/{job_id}",
                f"/internal/jobs/{job_id}/events",
                f"/internal/attempts/{uuid4()}?job_id={job_id}",
            )
        ]

    for answer in answers:
        assert answer.status_code == status
        assert answer.json() == {"detail": detail}  # nothing about the job
