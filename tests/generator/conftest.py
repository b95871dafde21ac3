"""Fixtures of the ai-generator tests: one stand-in model process for the session, a
stand-in for the orchestrator's attempt check (a real HTTP server in this process), and
an in-process generator on a test's own topology (``start_generator``), with requests
run through it to their results (``run_requests``, ``run_one``)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from canvas_events.auth import Principal, decode_token
from canvas_events.envelope import Envelope, utcnow
from canvas_events.errors import AuthError
from canvas_events.events import GenerationRequested, JobCancelled, JobCancelRequested
from canvas_events.runtime import serve_http
from canvas_events.topology import Topology
from canvas_generator.service import Service
from canvas_generator.settings import Settings
from tests.support.bus import FINAL_RESULTS
from tests.support.bus import Bus as SharedBus
from tests.support.fake_openai import FakeOpenAI
from tests.support.processes import free_port
from tests.support.waiting import eventually

API_KEY = "sk-generator-tests-0123456789abcdef"
JWT_SECRET = "generator-tests-secret-0123456789-abcdefghij"
# Nothing listens on port 1 (binding it needs root): connection refused at once, so the
# attempt check fails open. Tests of the check itself use the `orchestrator` fixture.
NO_ORCHESTRATOR = "http://127.0.0.1:1"


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    """The stand-in model, requiring API_KEY."""
    with FakeOpenAI(require_key=API_KEY) as fake:
        yield fake


def generator_settings(
    amqp_url: str, topology: Topology, fake: FakeOpenAI, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "amqp_topology_prefix": topology.prefix,
        "openai_api_key": API_KEY,
        "openai_base_url": fake.base_url,
        "openai_model": "gpt-4o-mini",
        "openai_timeout_seconds": 10,
        "max_concurrent_jobs": 4,
        "shutdown_grace_seconds": 10,
        "orchestrator_url": NO_ORCHESTRATOR,
        "jwt_secret": JWT_SECRET,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_generator(settings: Settings) -> AsyncIterator[Service]:
    """The generator's broker and worker, in this process, connected."""
    service = Service(settings)
    await service.start()
    try:
        await service.broker.wait_connected(15)
        yield service
    finally:
        await service.stop()


StartGenerator = Callable[..., contextlib.AbstractAsyncContextManager[Service]]
Results = dict[str, list[Envelope]]
RunOne = Callable[..., Awaitable[tuple[Envelope, list[Envelope]]]]


@pytest.fixture
def start_generator(amqp_url: str, topology: Topology, fake_openai: FakeOpenAI) -> StartGenerator:
    """``async with start_generator(**overrides) as generator``: a generator on the test's
    topology calling the session's stand-in model, with those settings changed."""

    def start(**overrides: Any) -> contextlib.AbstractAsyncContextManager[Service]:
        return running_generator(generator_settings(amqp_url, topology, fake_openai, **overrides))

    return start


def generation_request(
    query: str, *, attempt: int = 1, lease: timedelta = timedelta(minutes=5)
) -> Envelope:
    """A GenerationRequested envelope as the orchestrator's relay publishes it."""
    event = GenerationRequested(
        attempt_id=uuid.uuid4(),
        attempt=attempt,
        query=query,
        priority=5,
        lease_expires_at=utcnow() + lease,
    )
    return Envelope.wrap(
        event,
        correlation_id=f"test-{uuid.uuid4().hex[:12]}",
        job_id=uuid.uuid4(),
        user_id="user-1",
        canvas_id="canvas-1",
    )


class Bus(SharedBus):
    """The test's side of the broker (tests/support/bus.py): publishes work, sees every
    ``generator.*`` message; ``seen`` queues those not read yet (``next()`` and
    ``results()`` take from it)."""

    def __init__(self, amqp_url: str, topology: Topology) -> None:
        super().__init__(amqp_url, topology, listen="generator.#")

    @property
    def seen(self) -> asyncio.Queue[Envelope]:
        return self.arrivals


@pytest.fixture
async def bus(amqp_url: str, topology: Topology) -> AsyncIterator[Bus]:
    bus = Bus(amqp_url, topology)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop()


@pytest.fixture
def run_requests(start_generator: StartGenerator, bus: Bus) -> Callable[..., Awaitable[Results]]:
    """``await run_requests(*requests, **overrides)``: publish ``requests`` to a fresh
    generator (settings ``overrides``); every message read until each has its result, by
    job (:meth:`Bus.results`)."""

    async def run(*requests: Envelope, **overrides: Any) -> Results:
        async with start_generator(**overrides):
            for request in requests:
                await bus.publish(request)
            return await bus.results(*requests)

    return run


@pytest.fixture
def run_one(run_requests: Callable[..., Awaitable[Results]]) -> RunOne:
    """``await run_one(query, **overrides)``: one request for ``query`` run as
    ``run_requests`` runs it; the request, and its messages in order."""

    async def run(query: str, **overrides: Any) -> tuple[Envelope, list[Envelope]]:
        request = generation_request(query)
        return request, (await run_requests(request, **overrides))[str(request.job_id)]

    return run


def milestones(envelopes: list[Envelope]) -> list[str]:
    """The types of an attempt's messages, without the GenerationProgressed events that
    a streamed reply puts between its GenerationStarted and its result."""
    return [e.type for e in envelopes if e.type != "GenerationProgressed"]


async def messages_until_a_later_attempt_ends(bus: Bus) -> dict[str, list[str]]:
    """Run one more attempt to its result; the types of every generator.* message received
    meanwhile, by job. The generator publishes on one channel, in order, so whatever it
    published for an earlier attempt arrives before the later attempt's result."""
    later = generation_request("a later flowchart")
    await bus.publish(later)
    seen: list[Envelope] = []
    # Not bus.results(): it would wait for a result of the earlier attempt too.
    while not (seen and seen[-1].job_id == later.job_id and seen[-1].type in FINAL_RESULTS):
        seen.append(await bus.next())
    assert seen[-1].type == "GenerationSucceeded"
    while not bus.seen.empty():
        seen.append(bus.seen.get_nowait())
    types: dict[str, list[str]] = {}
    for envelope in seen:
        types.setdefault(str(envelope.job_id), []).append(envelope.type)
    return types


async def wait_aborted(generator: Service, fake: FakeOpenAI, before: dict[str, Any]) -> None:
    """Wait until ``generator`` counted its one attempt cancelled and the stand-in saw the
    model call end (``before``: its stats before the call); the call must have been
    abandoned (the client hung up), and nothing left in flight."""
    await eventually(
        lambda: fake.stats()["in_flight"] == before["in_flight"],
        what="the stand-in to see the call end",
    )
    await eventually(
        lambda: (
            generator.metrics.registry.get_sample_value("canvas_generation_cancelled_total") == 1
        ),
        what="the attempt counted as cancelled",
    )
    assert fake.stats()["abandoned"] == before["abandoned"] + 1
    assert generator.cancellations.in_flight == 0


def cancel_message(request: Envelope, *, requested: bool = False) -> Envelope:
    """The JobCancelled (or JobCancelRequested) the relay publishes for ``request``'s job."""
    event = JobCancelRequested(reason="test") if requested else JobCancelled(reason="test")
    return Envelope.wrap(
        event,
        correlation_id=request.correlation_id,
        job_id=request.job_id,
        user_id=request.user_id,
        canvas_id=request.canvas_id,
    )


@dataclass
class Answer:
    """What the stand-in orchestrator answers for one attempt."""

    status_code: int = 200
    current: bool = True
    status: str = "queued"
    delay: float = 0.0
    body: Any = None  # sent as is instead of the usual answer, when given


class StubOrchestrator:
    """``GET /internal/attempts/{attempt_id}`` as the orchestrator serves it, answering
    what a test set in ``answers`` (current and queued when not set); ``asked`` records
    each question as (attempt_id, job_id), ``callers`` the principal of each (the
    internal API answers only a service credential signed with JWT_SECRET)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.answers: dict[str, Answer] = {}
        self.asked: list[tuple[str, str | None]] = []
        self.callers: list[Principal] = []
        self.app = FastAPI()

        @self.app.get("/internal/attempts/{attempt_id}")
        async def attempt(attempt_id: str, request: Request, job_id: str | None = None) -> Response:
            token = request.headers.get("authorization", "").removeprefix("Bearer ")
            try:
                caller = decode_token(token, JWT_SECRET)
            except AuthError:
                return JSONResponse({"detail": "service credential required"}, status_code=401)
            if not caller.is_service:
                return JSONResponse({"detail": "service credential required"}, status_code=403)
            self.callers.append(caller)
            self.asked.append((attempt_id, job_id))
            answer = self.answers.get(attempt_id, Answer())
            if answer.delay:
                await asyncio.sleep(answer.delay)
            body = answer.body
            if body is None:
                body = {
                    "attempt_id": attempt_id,
                    "job_id": job_id,
                    "current": answer.current,
                    "status": answer.status,
                }
                if answer.status_code != 200:
                    body = {"detail": "stub says no"}
            return JSONResponse(body, status_code=answer.status_code)

        @self.app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def attempts_asked(self) -> set[str]:
        return {attempt_id for attempt_id, _ in self.asked}


@pytest.fixture(scope="session")
async def orchestrator() -> AsyncIterator[StubOrchestrator]:
    """The stand-in orchestrator, serving on a free port for the session."""
    stub = StubOrchestrator()
    stop = asyncio.Event()
    server = asyncio.create_task(serve_http(stub.app, stub.port, stop, host="127.0.0.1"))

    async def up() -> bool:
        if server.done():
            server.result()  # raises what stopped it
        async with httpx.AsyncClient(timeout=1) as client:
            with contextlib.suppress(httpx.HTTPError):
                return (await client.get(f"{stub.url}/health")).status_code == 200
        return False

    await eventually(up, timeout=20, what="the stand-in orchestrator up")
    try:
        yield stub
    finally:
        stop.set()
        await server
