"""What an operator sees of a running system (issue 5, docs/operations.md): one query
follows a job through the four services' logs, no secret leaks anywhere, the metrics
count what happened, admins get a debug view, and the health answer tells the truth.

Two systems of real processes, one per class and never both at once (2 cores). The
first runs one set of jobs (drawn, failing after a retry, rejected, cancelled) under
recognisable secrets, and its tests read what that run left behind. The second has a
queued-age threshold of one second, and its tests stop and start processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from canvas_events.auth import mint_token
from canvas_events.topology import Topology
from tests.support.env import database_url
from tests.support.system import System, running_system

pytestmark = pytest.mark.e2e

T = TypeVar("T")

# ServiceProcess name: the `service` field of its log lines (docs/operations.md).
SERVICES = {
    "gateway": "gateway",
    "orchestrator": "job-orchestrator",
    "generator": "ai-generator",
    "notifier": "notifier",
}
LEVELS = {"debug", "info", "warning", "error", "critical"}
DEADLINE_SECONDS = 30.0
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_FINAL_FRAMES = {"ai_generation_completed", "ai_job_cancelled"}


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = DEADLINE_SECONDS) -> T:
    """Run ``check`` until it stops failing; past the deadline its last failure is the
    test's. Logs, metrics and read models settle a moment after the answer a client saw."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


def with_password(url: str, password: str) -> str:
    """``url`` logging in with ``password`` (the local PostgreSQL trusts 127.0.0.1, so any
    password connects: it is there to be looked for)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}"))


def new_database_url() -> str:
    return database_url(f"cj_obs_{uuid.uuid4().hex[:12]}")


# -- one run of jobs -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A job of the run: what to ask, and the status it must end in."""

    query: str
    status: str


# MAX_JOB_RETRIES=1: a retryable failure is retried once, then the job fails. Model
# calls: 1 + 1 + 2 + 2 + 1 + 1 (the cancelled one is aborted in flight) = 8.
CASES = {
    "drawn": Case("a flowchart of a login flow", "completed"),
    "drawn-with-invalid": Case("a mind map of a launch plan [[fake:invalid=2]]", "completed"),
    "server-error": Case("a timeline of a release [[fake:status=500]]", "failed"),
    "garbage": Case("an org chart of a team [[fake:garbage]]", "failed"),
    "rejected-key": Case("a kanban board [[fake:status=401]]", "failed"),
    "cancelled": Case("a sitemap of a shop [[fake:timeout]]", "cancelled"),
}
MODEL_CALLS = 8


@dataclass(frozen=True)
class Secrets:
    """Values no log line, answer or metric may show. Each ends in a random part that is
    looked for on its own too, so that a half-masked copy is caught as well."""

    openai_key: str
    jwt_secret: str
    database_password: str

    @classmethod
    def make(cls) -> Secrets:
        def value(kind: str) -> str:
            return f"{kind}-LEAKCHECK-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"

        return cls(value("sk"), value("jwt"), value("pw"))

    def needles(self) -> dict[str, str]:
        """{what: text to look for}."""
        found = {}
        for name, secret in vars(self).items():
            found[name] = secret
            if "-LEAKCHECK-" in secret:  # not a password DATABASE_URL came with
                found[f"{name} (random part)"] = secret.rsplit("-", 1)[1]
        return found


@dataclass
class Job:
    name: str
    case: Case
    request_id: str  # the X-Request-ID sent with the create: the job's correlation id
    job_id: str = ""
    canvas_id: str = ""
    cancel_request_id: str | None = None


@dataclass
class Run:
    """A system that ran every case once, and what the test saw of it."""

    system: System
    secrets: Secrets
    user_token: str
    admin_token: str
    gateway: httpx.AsyncClient  # every answer is kept and every request counted
    other: httpx.AsyncClient  # for the other services' ports; every answer is kept
    jobs: dict[str, Job]
    frames: list[dict[str, Any]]  # every WebSocket frame received
    answers: list[tuple[str, str]] = field(default_factory=list)  # (request, body)
    # (method, route template, status) of every answer the gateway gave this test.
    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)

    def auth(self, *, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token if admin else self.user_token}"}

    def lines(self, process: str) -> list[dict[str, Any]]:
        return self.system.processes[process].log_lines()

    def all_lines(self) -> list[dict[str, Any]]:
        return [line for process in SERVICES for line in self.lines(process)]


def _final(frame: dict[str, Any]) -> bool:
    return frame["type"] in _FINAL_FRAMES or (
        frame["type"] == "ai_job_error" and bool(frame["data"].get("final"))
    )


async def _read_frames(ws: Any, frames: list[dict[str, Any]]) -> None:
    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
        async for raw in ws:
            frames.append(json.loads(raw))


async def _run_cases(run: Run) -> None:
    """The cancelled job first and alone, cancelled while the stand-in holds its call (so
    the call count is exact); then the others, all at once."""
    system, http = run.system, run.gateway

    async def create(job: Job) -> None:
        response = await http.post(
            "/api/ai-agent/create-canvas",
            json={"query": job.case.query},
            headers={**run.auth(), "X-Request-ID": job.request_id},
        )
        assert response.status_code == 202, response.text
        job.job_id, job.canvas_id = response.json()["job_id"], response.json()["canvas_id"]

    cancelled = run.jobs["cancelled"]
    await create(cancelled)

    async def call_held() -> None:
        stats = (await run.other.get(f"{system.fake_openai_url}/_fake/stats")).json()
        assert stats["in_flight"] == 1, stats

    await eventually(call_held)
    cancelled.cancel_request_id = f"{cancelled.request_id}.cancel"
    response = await http.post(
        f"/api/ai-agent/job/{cancelled.job_id}/cancel",
        headers={**run.auth(), "X-Request-ID": cancelled.cancel_request_id},
    )
    assert response.status_code == 202, response.text
    await asyncio.gather(*(create(job) for job in run.jobs.values() if job is not cancelled))

    async def all_final() -> None:
        finals = {frame["job_id"]: frame for frame in run.frames if _final(frame)}
        missing = [job.name for job in run.jobs.values() if job.job_id not in finals]
        assert not missing, f"no final frame yet for {missing}"

    await eventually(all_final, timeout=60)
    for job in run.jobs.values():
        status = await http.get(f"/api/ai-agent/job/{job.job_id}/status", headers=run.auth())
        assert status.json()["status"] == job.case.status, (job.name, status.json())


@pytest.fixture(scope="class")
async def run(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Run]:
    secrets = Secrets.make()
    base = new_database_url()
    # A server that needs a password has one in DATABASE_URL already: look for that one.
    password = urlsplit(base).password
    if password is None:
        base = with_password(base, secrets.database_password)
    else:
        secrets = Secrets(secrets.openai_key, secrets.jwt_secret, password)
    env = {
        "OPENAI_API_KEY": secrets.openai_key,
        "FAKE_OPENAI_REQUIRE_KEY": secrets.openai_key,
        "JWT_SECRET": secrets.jwt_secret,
        "MAX_JOB_RETRIES": "1",
    }
    tag = uuid.uuid4().hex[:8]
    jobs = {name: Job(name, case, f"obs-{name}-{tag}") for name, case in CASES.items()}
    async with contextlib.AsyncExitStack() as stack:
        system = await stack.enter_async_context(
            running_system(
                tmp_path_factory.mktemp("observed-logs"),
                label="obs",
                extra_env=env,
                database=base,
            )
        )
        user_token = mint_token(f"observer-{tag}", secrets.jwt_secret)
        admin_token = mint_token(f"operator-{tag}", secrets.jwt_secret, admin=True)
        answers: list[tuple[str, str]] = []
        requests: Counter[tuple[str, str, int]] = Counter()

        async def keep(response: httpx.Response) -> None:
            await response.aread()
            answers.append((f"{response.request.method} {response.request.url}", response.text))

        async def count(response: httpx.Response) -> None:
            route = _UUID.sub("{job_id}", response.request.url.path)
            requests[(response.request.method, route, response.status_code)] += 1

        gateway = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=system.gateway_url, timeout=10, event_hooks={"response": [keep, count]}
            )
        )
        other = await stack.enter_async_context(
            httpx.AsyncClient(timeout=10, event_hooks={"response": [keep]})
        )
        ws = await stack.enter_async_context(websockets.connect(system.websocket_url(user_token)))
        frames: list[dict[str, Any]] = []
        reader = asyncio.create_task(_read_frames(ws, frames))

        async def stop_reading() -> None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

        stack.push_async_callback(stop_reading)
        observed = Run(
            system=system,
            secrets=secrets,
            user_token=user_token,
            admin_token=admin_token,
            gateway=gateway,
            other=other,
            jobs=jobs,
            frames=frames,
            answers=answers,
            requests=requests,
        )
        await _run_cases(observed)
        yield observed


# Per case, the lines that must follow the job: (service, event, fields). A field's
# value is what it must equal, or ... when it must only be there. Those with
# correlation "cancel" carry the cancel request's id, the others the create's.
Step = tuple[str, str, dict[str, Any]]
_ACCEPTED: list[Step] = [
    ("gateway", "job accepted", {"canvas_id": ...}),
    ("job-orchestrator", "job requested", {"position": ...}),
    ("job-orchestrator", "job queued", {"retry_count": 0}),
    ("job-orchestrator", "attempt dispatched", {"attempt": 1, "attempt_id": ...}),
    ("ai-generator", "attempt started", {"model": "fake-canvas-1", "attempt": 1}),
    ("job-orchestrator", "attempt started", {"model": "fake-canvas-1"}),
]
_CALL: Step = (
    "ai-generator",
    "openai call made",
    {"model": ..., "latency_ms": ..., "total_tokens": ..., "prompt_tokens": ...},
)


def _retried_then_failed(kind: str) -> list[Step]:
    return [
        ("ai-generator", "attempt failed", {"kind": kind, "retryable": True}),
        ("job-orchestrator", "attempt failed", {"kind": kind}),
        ("job-orchestrator", "retry scheduled", {"retry_count": 1, "next_attempt_at": ...}),
        ("notifier", "event pushed", {"type": "JobRetryScheduled", "connections": 1}),
        ("job-orchestrator", "job queued", {"retry_count": 1}),
        ("job-orchestrator", "attempt dispatched", {"attempt": 2}),
        ("ai-generator", "attempt started", {"attempt": 2}),
        ("job-orchestrator", "job failed", {"retry_count": 1, "error": ...}),
        ("notifier", "event pushed", {"type": "JobFailed", "connections": 1}),
    ]


STEPS: dict[str, list[Step]] = {
    "drawn": [
        *_ACCEPTED,
        _CALL,
        ("ai-generator", "objects parsed", {"count": ..., "dropped": 0}),
        ("job-orchestrator", "attempt succeeded", {"objects": ..., "dropped_objects": 0}),
        # The objects are saved in the transaction that records JobCompleted: this line
        # is the "objects saved" step.
        ("job-orchestrator", "job completed", {"object_count": ..., "latency_ms": ...}),
        ("notifier", "event pushed", {"type": "JobCompleted", "connections": 1}),
    ],
    "drawn-with-invalid": [
        *_ACCEPTED,
        _CALL,
        ("ai-generator", "objects parsed", {"count": ..., "dropped": 2}),
        ("job-orchestrator", "attempt succeeded", {"dropped_objects": 2}),
        ("job-orchestrator", "job completed", {"object_count": ...}),
        ("notifier", "event pushed", {"type": "JobCompleted", "connections": 1}),
    ],
    "server-error": [*_ACCEPTED, *_retried_then_failed("server_error")],
    "garbage": [*_ACCEPTED, _CALL, *_retried_then_failed("bad_output")],
    "rejected-key": [
        *_ACCEPTED,
        ("ai-generator", "attempt failed", {"kind": "invalid_api_key", "retryable": False}),
        ("job-orchestrator", "attempt failed", {"kind": "invalid_api_key"}),
        ("job-orchestrator", "job failed", {"retry_count": 0, "error": ...}),
        ("notifier", "event pushed", {"type": "JobFailed", "connections": 1}),
    ],
    "cancelled": [
        *_ACCEPTED,
        ("gateway", "job cancel requested", {"correlation": "cancel"}),
        ("job-orchestrator", "cancel requested", {"correlation": "cancel"}),
        ("job-orchestrator", "job cancelled", {"correlation": "cancel"}),
        ("ai-generator", "cancelling attempt in flight", {"correlation": "cancel"}),
        ("ai-generator", "attempt cancelled", {}),
        ("notifier", "event pushed", {"type": "JobCancelled", "correlation": "cancel"}),
    ],
}


def _matches(line: dict[str, Any], service: str, event: str, fields: dict[str, Any]) -> bool:
    if (line.get("service"), line.get("event")) != (service, event):
        return False
    for name, expected in fields.items():
        if name == "correlation":
            continue
        if name not in line or (expected is not ... and line[name] != expected):
            return False
    return True


class TestARunOfJobs:
    """Six jobs run once; each test reads what they left behind."""

    async def test_every_log_line_is_json_with_timestamp_level_service_and_event(
        self, run: Run
    ) -> None:
        for process, service in SERVICES.items():
            lines = run.lines(process)  # fails on a line that is not JSON
            assert lines, f"{process} wrote no log line"
            for line in lines:
                for key in ("timestamp", "level", "service", "event"):
                    assert key in line, (process, line)
                stamp = datetime.fromisoformat(line["timestamp"])
                assert stamp.utcoffset() == timedelta(0), line
                assert line["level"] in LEVELS, line
                assert line["service"] == service, line
                assert isinstance(line["event"], str) and line["event"], line
                if "job_id" in line:
                    assert line.get("correlation_id"), f"job_id without correlation_id: {line}"

    @pytest.mark.parametrize("name", list(CASES))
    async def test_one_query_on_the_job_id_follows_each_step_through_the_four_services(
        self, run: Run, name: str
    ) -> None:
        job = run.jobs[name]

        async def every_step_logged() -> list[dict[str, Any]]:
            mine = [line for line in run.all_lines() if line.get("job_id") == job.job_id]
            missing = [
                (service, event, fields)
                for service, event, fields in STEPS[name]
                if not any(_matches(line, service, event, fields) for line in mine)
            ]
            assert not missing, f"{name}: steps not logged for {job.job_id}: {missing}"
            return mine

        mine = await eventually(every_step_logged)
        assert {line["service"] for line in mine} == set(SERVICES.values())
        for service, event, fields in STEPS[name]:
            wanted = job.cancel_request_id if fields.get("correlation") else job.request_id
            found = [line for line in mine if _matches(line, service, event, fields)]
            assert any(line["correlation_id"] == wanted for line in found), (wanted, found)
        # Every line of the job is the create's request, or (after it) the cancel's; the
        # gateway's access lines carry the id of the request they log.
        expected = {job.request_id, job.cancel_request_id} - {None}
        for line in mine:
            if line["event"] != "request":
                assert line["correlation_id"] in expected, line

    @pytest.mark.parametrize("name", [name for name in CASES if name != "cancelled"])
    async def test_one_query_on_the_correlation_id_finds_the_job_in_the_four_services(
        self, run: Run, name: str
    ) -> None:
        job = run.jobs[name]

        async def in_every_service() -> None:
            lines = [
                line for line in run.all_lines() if line.get("correlation_id") == job.request_id
            ]
            assert {line["service"] for line in lines} == set(SERVICES.values()), lines
            assert {line.get("job_id") for line in lines} == {job.job_id}

        await eventually(in_every_service)

    async def test_no_secret_in_any_log_line_error_message_answer_or_metric(self, run: Run) -> None:
        system, http, other = run.system, run.gateway, run.other
        for job in run.jobs.values():
            await http.get(f"/api/ai-agent/job/{job.job_id}/status", headers=run.auth())
            await http.get(f"/api/ai-agent/job/{job.job_id}/events", headers=run.auth())
            orchestrator = system.url("orchestrator")
            internal = system.service_headers()
            await other.get(f"{orchestrator}/internal/jobs/{job.job_id}", headers=internal)
            await other.get(f"{orchestrator}/internal/jobs/{job.job_id}/events", headers=internal)
        await http.get("/api/ai-agent/jobs", headers=run.auth())
        await http.get("/api/ai-agent/health")
        assert (
            await http.get("/api/ai-agent/debug/environment", headers=run.auth())
        ).status_code == 403
        debug = await http.get("/api/ai-agent/debug/environment", headers=run.auth(admin=True))
        assert debug.status_code == 200
        forged = mint_token("intruder", "not-the-secret-" + "x" * 40)
        refused = await http.get(
            "/api/ai-agent/jobs", headers={"Authorization": f"Bearer {forged}"}
        )
        assert refused.status_code == 401
        for process in SERVICES:
            for path in ("/health", "/ready", "/metrics"):
                await other.get(f"{system.url(process)}{path}")

        # The failures say what went wrong, in words an operator can act on.
        rejected = await http.get(
            f"/api/ai-agent/job/{run.jobs['rejected-key'].job_id}/status", headers=run.auth()
        )
        assert "401" in rejected.json()["error_message"]

        logs = {process: system.processes[process].log_path.read_text() for process in SERVICES}
        # Not vacuous: the logs and answers hold the jobs, their errors and their events.
        for job in run.jobs.values():
            assert all(job.job_id in text for text in logs.values()), job.name
        assert len(run.answers) > 40

        needles = run.secrets.needles()
        needles |= {"user token": run.user_token, "admin token": run.admin_token}
        # The broker's password here is "guest", a word too common to look for alone; its
        # credentials in URL form are not.
        amqp = urlsplit(system.amqp_url)
        if amqp.password:
            needles["AMQP credentials"] = f"{amqp.username}:{amqp.password}@"
        places = {f"log of {process}": text for process, text in logs.items()}
        places |= {f"answer to {request}": body for request, body in run.answers}
        places["WebSocket frames"] = json.dumps(run.frames)
        leaks = [
            f"{what} in {where}"
            for where, text in places.items()
            for what, needle in needles.items()
            if needle in text
        ]
        assert not leaks, leaks

    async def test_metrics_are_prefixed_canvas_and_count_what_happened(self, run: Run) -> None:
        system = run.system
        stand_in = (await run.other.get(f"{system.fake_openai_url}/_fake/stats")).json()
        assert stand_in["calls"] == MODEL_CALLS, stand_in

        async def scrape(process: str) -> Samples:
            response = await run.other.get(f"{system.url(process)}/metrics")
            assert response.status_code == 200
            return Samples.parse(response.text)

        for process in SERVICES:
            names = (await scrape(process)).names()
            outside = sorted(name for name in names if not name.startswith("canvas_"))
            assert not outside, f"{process} exports metrics without the canvas_ prefix: {outside}"

        async def orchestrator_counts() -> None:
            metrics = await scrape("orchestrator")
            jobs = {
                status: metrics.value("canvas_jobs_total", status=status)
                for status in (
                    "queued",
                    "processing",
                    "retry_scheduled",
                    "completed",
                    "failed",
                    "cancelled",
                )
            }
            # Queued: each job once, and again after each of the two retries; processing:
            # each attempt a generator started, one per model call.
            assert jobs == {
                "queued": 8,
                "processing": MODEL_CALLS,
                "retry_scheduled": 2,
                "completed": 2,
                "failed": 3,
                "cancelled": 1,
            }
            # One per attempt whose result was recorded: not the aborted one.
            assert metrics.value("canvas_attempt_duration_seconds_count") == MODEL_CALLS - 1
            queues = {labels["queue"] for labels in metrics.label_sets("canvas_queue_depth")}
            topology = Topology(system.prefix)
            assert {topology.orchestrator.name, topology.generator_work.name} <= queues
            assert metrics.value("canvas_outbox_lag_events") == 0

        async def generator_counts() -> None:
            metrics = await scrape("generator")
            assert metrics.value("canvas_openai_request_seconds_count") == MODEL_CALLS
            errors = {
                labels["kind"]: value
                for labels, value in metrics.with_labels("canvas_openai_errors_total")
            }
            nonzero = {kind: value for kind, value in errors.items() if value}
            assert nonzero == {"server_error": 2, "bad_output": 2, "invalid_api_key": 1}
            assert metrics.value("canvas_generation_attempt_seconds_count") == MODEL_CALLS

        async def notifier_counts() -> None:
            metrics = await scrape("notifier")
            assert metrics.value("canvas_websocket_connections") == 1
            assert metrics.value("canvas_websocket_messages_sent_total") >= len(run.frames)

        async def gateway_counts() -> None:
            metrics = await scrape("gateway")
            made = {key: n for key, n in run.requests.items() if key[1].startswith("/api/")}
            assert made[("POST", "/api/ai-agent/create-canvas", 202)] == len(CASES)
            for (method, route, code), n in made.items():
                counted = metrics.value(
                    "canvas_http_requests_total", method=method, route=route, status=str(code)
                )
                assert counted == n, (method, route, code, counted, n)

        await eventually(orchestrator_counts)
        await eventually(generator_counts)
        await eventually(notifier_counts)
        await eventually(gateway_counts)

    async def test_debug_environment_shows_processors_queues_and_last_errors_to_admins_only(
        self, run: Run
    ) -> None:
        http = run.gateway
        refused = await http.get("/api/ai-agent/debug/environment", headers=run.auth())
        assert refused.status_code == 403
        response = await http.get("/api/ai-agent/debug/environment", headers=run.auth(admin=True))
        assert response.status_code == 200
        body = response.json()
        topology = Topology(run.system.prefix)
        assert body["processors"] == {
            "generators": {"queue": topology.generator_work.name, "consumers": 1},
            "orchestrators": {"queue": topology.orchestrator.name, "consumers": 1},
        }
        depths = {queue["name"]: queue["messages"] for queue in body["queues"]}
        assert set(depths) == {
            topology.orchestrator.name,
            topology.generator_work.name,
            *topology.dead_letter_queues,
        }
        assert all(depth == 0 for depth in depths.values()), depths
        assert body["jobs"]["by_status"] == {"completed": 2, "failed": 3, "cancelled": 1}
        recent = {job["id"]: job for job in body["jobs"]["recent"]}
        for job in run.jobs.values():
            shown = recent[job.job_id]
            assert shown["status"] == job.case.status
            # The last error stays on a failed job; a drawn or cancelled one shows none.
            assert bool(shown["error_message"]) == (job.case.status == "failed"), shown
        assert body["status"] == "healthy", body["issues"]
        assert body["job_processor"]["outbox_lag"] == 0


# -- health ----------------------------------------------------------------------------

NO_GENERATOR = "no generator consumes the work queue"
NO_ORCHESTRATOR = "no orchestrator consumes its queue"
QUEUED_TOO_LONG = "the oldest queued job has waited"
OUTBOX_BEHIND = "the outbox relay is"
OUTBOX_STALE = "the oldest unpublished event has waited"


async def _health(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/api/ai-agent/health")
    body: dict[str, Any] = response.json()
    assert response.status_code == (503 if body["status"] == "unhealthy" else 200), body
    return body


async def _healthy(http: httpx.AsyncClient) -> dict[str, Any]:
    body = await _health(http)
    assert body["status"] == "healthy", body
    assert body["issues"] == []
    return body


def _has_issue(body: dict[str, Any], beginning: str) -> bool:
    return any(issue.startswith(beginning) for issue in body["issues"])


@contextlib.asynccontextmanager
async def stopped(system: System, process: str) -> AsyncIterator[None]:
    """``process`` stopped (SIGTERM) for the block, started again after it."""
    service = system.processes[process]
    service.stop()
    try:
        yield
    finally:
        service.start()
        await service.wait_ready()


@pytest.fixture(scope="class")
async def health_system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    log_dir = tmp_path_factory.mktemp("health-logs")
    async with running_system(
        log_dir, label="health", extra_env={"HEALTH_QUEUED_AGE_SECONDS": "1"}
    ) as system:
        yield system


class TestHealth:
    """GET /api/ai-agent/health while processes stop and work waits."""

    @pytest.fixture
    async def http(self, health_system: System) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(base_url=health_system.gateway_url, timeout=10) as client:
            await eventually(lambda: _healthy(client))
            yield client
            await eventually(lambda: _healthy(client))

    async def test_health_is_degraded_while_no_generator_consumes_the_work_queue(
        self, health_system: System, http: httpx.AsyncClient
    ) -> None:
        healthy = await _healthy(http)
        assert healthy["job_processor"]["generator_consumers"] == 1
        assert healthy["job_processor"]["orchestrator_consumers"] == 1
        async with stopped(health_system, "generator"):

            async def degraded() -> dict[str, Any]:
                body = await _health(http)
                assert body["status"] == "degraded", body
                return body

            body = await eventually(degraded)
            assert body["issues"] == [NO_GENERATOR]
            assert body["job_processor"]["generator_consumers"] == 0
        assert (await _healthy(http))["job_processor"]["generator_consumers"] == 1

    async def test_health_is_degraded_when_a_queued_job_waits_longer_than_the_threshold(
        self, health_system: System, http: httpx.AsyncClient
    ) -> None:
        token = health_system.token("waiting-user")
        headers = {"Authorization": f"Bearer {token}"}
        async with stopped(health_system, "generator"):
            created = await http.post(
                "/api/ai-agent/create-canvas", json={"query": "a queue"}, headers=headers
            )
            assert created.status_code == 202, created.text
            job_id = created.json()["job_id"]

            async def waited_too_long() -> dict[str, Any]:
                body = await _health(http)
                assert _has_issue(body, QUEUED_TOO_LONG), body
                # The attempt reaches the work queue through the relay, which a busy
                # PostgreSQL cluster can hold back past the 1 s threshold.
                assert body["job_processor"]["queued_messages"] == 1, body
                return body

            body = await eventually(waited_too_long)
            assert body["status"] == "degraded"
            assert NO_GENERATOR in body["issues"]
            processor = body["job_processor"]
            assert processor["oldest_queued_age_seconds"] > 1
            assert processor["queued_messages"] == 1

        async def completed() -> None:
            status = await http.get(f"/api/ai-agent/job/{job_id}/status", headers=headers)
            assert status.json()["status"] == "completed"

        await eventually(completed)
        assert (await _healthy(http))["job_processor"]["oldest_queued_age_seconds"] is None

    async def test_health_is_degraded_when_the_outbox_relay_lags(
        self, health_system: System, http: httpx.AsyncClient
    ) -> None:
        # With no orchestrator, no relay publishes: events recorded meanwhile (written
        # here straight into the store, an hour old) wait unpublished.
        stream = uuid.uuid4()
        conn = await asyncpg.connect(health_system.database_url)
        try:
            async with stopped(health_system, "orchestrator"):
                await conn.execute(
                    """
                    INSERT INTO events (stream_id, version, event_id, type, schema_version,
                                        occurred_at, recorded_at, correlation_id, user_id, data)
                    SELECT $1, v, gen_random_uuid(), 'JobQueued', 1, now() - interval '1 hour',
                           now() - interval '1 hour', 'health-test', 'nobody', '{}'::jsonb
                    FROM generate_series(1, 1001) AS v
                    """,
                    stream,
                )
                try:

                    async def lagging() -> dict[str, Any]:
                        body = await _health(http)
                        assert NO_ORCHESTRATOR in body["issues"], body
                        return body

                    body = await eventually(lagging)
                    assert body["status"] == "degraded"
                    assert _has_issue(body, OUTBOX_BEHIND), body
                    assert _has_issue(body, OUTBOX_STALE), body
                    assert body["job_processor"]["outbox_lag"] >= 1001
                    assert body["job_processor"]["oldest_unpublished_age_seconds"] >= 3600
                finally:
                    # Gone before the relay is back: nobody is to receive them.
                    await conn.execute("DELETE FROM events WHERE stream_id = $1", stream)
        finally:
            await conn.close()


# -- metrics parsing -------------------------------------------------------------------


@dataclass
class Samples:
    """Every sample of one /metrics answer."""

    samples: list[tuple[str, dict[str, str], float]]
    families: set[str]

    @classmethod
    def parse(cls, text: str) -> Samples:
        samples: list[tuple[str, dict[str, str], float]] = []
        families: set[str] = set()
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            for sample in family.samples:
                samples.append((sample.name, dict(sample.labels), sample.value))
        return cls(samples, families)

    def names(self) -> set[str]:
        return self.families | {name for name, _, _ in self.samples}

    def with_labels(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(labels, value) for sample, labels, value in self.samples if sample == name]

    def label_sets(self, name: str) -> list[dict[str, str]]:
        return [labels for labels, _ in self.with_labels(name)]

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples that carry ``labels``; fails when there is none."""
        found = [
            value
            for sample_labels, value in self.with_labels(name)
            if labels.items() <= sample_labels.items()
        ]
        assert found, f"no sample {name}{labels or ''}"
        return sum(found)
