"""HTTP endpoints of the orchestrator: health, readiness, metrics, and the internal read
API (jobs, attempts and streams), which answers only the system's own services: a bearer
token with role ``service`` signed with JWT_SECRET (docs/api.md). Anyone else gets 401
(no or a bad token) or 403 (a user's token), and nothing about any job."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from canvas_events.auth import Principal, decode_token
from canvas_events.broker import Broker
from canvas_events.envelope import utcnow
from canvas_events.errors import AuthError
from canvas_events.ops import Probes, Readiness
from canvas_events.postgres import Database, DatabaseUnavailable, is_outage
from canvas_orchestrator import dispatch
from canvas_orchestrator.metrics import BUSIEST_USERS, Metrics
from canvas_store import budget, jobs
from canvas_store.events import load


async def _connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    database: Database = request.app.state.database
    try:
        pool = database.pool
        conn = await pool.acquire()
    except Exception as exc:
        # A restarting database is "not now", not a server error.
        if is_outage(exc):
            raise HTTPException(503, detail=f"database unavailable: {type(exc).__name__}") from None
        raise
    try:
        yield conn
    finally:
        await pool.release(conn)


Conn = Annotated[asyncpg.Connection, Depends(_connection)]
_bearer = HTTPBearer(auto_error=False)


def _service_caller(secret: str) -> Any:
    """The dependency that lets only a service credential through."""

    async def service_caller(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise HTTPException(401, detail="service credential required", headers=challenge)
        try:
            caller = decode_token(credentials.credentials, secret)
        except AuthError as exc:
            raise HTTPException(401, detail=str(exc), headers=challenge) from None
        if not caller.is_service:
            raise HTTPException(403, detail="service credential required")
        return caller

    return Depends(service_caller)


_READY = (
    "200 when the database answers and both broker connections (consumer and relay "
    "publisher) are up, else 503 with the reasons."
)


def create_app(
    *,
    database: Database,
    broker: Broker,
    readiness: Readiness,
    metrics: Metrics,
    secret: str,
    model_budget: budget.Budget | None = None,
) -> FastAPI:
    """The orchestrator's FastAPI app over the service's running parts; ``secret`` checks
    the service credential of the internal API; ``model_budget``: the fleet's limits
    (MODEL_REQUESTS_PER_MINUTE, MODEL_TOKENS_PER_MINUTE)."""
    app = FastAPI(
        title="canvas-jobs job-orchestrator",
        summary="Health, metrics and the internal read API of the job state machine.",
        # FastAPI's own spans, metrics and logs off (docs/operations.md, "Traces").
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.database = database
    app.state.model_budget = model_budget or budget.Budget()
    app.state.metrics = metrics
    refresh = functools.partial(_sample_backlog, database, broker, metrics)
    probes = Probes(readiness, metrics.registry, refresh=refresh)
    app.include_router(probes.router(ready_description=_READY))
    app.include_router(_internal, prefix="/internal", dependencies=[_service_caller(secret)])
    return app


async def _sample_backlog(database: Database, broker: Broker, metrics: Metrics) -> None:
    """The gauges sampled at scrape: queue depths and the oldest queued job's age."""
    for spec in (broker.topology.orchestrator, broker.topology.generator_work):
        stats = await broker.queue_stats(spec.name)
        if stats is not None:
            metrics.queue_depth.labels(spec.name).set(stats[0])
    with contextlib.suppress(DatabaseUnavailable, OSError, asyncpg.PostgresError):
        # jobs_status index; a queued job's updated_at is when it was (re)queued.
        metrics.oldest_queued_age.set(await jobs.oldest_queued_age(database.pool))
        busiest = await jobs.busiest_users(database.pool, BUSIEST_USERS)
        metrics.unfinished_by_user.clear()  # users no longer among the busiest go
        for user, count in busiest:
            metrics.unfinished_by_user.labels(user).set(count)


# Served under /internal, to the system's own services only (create_app).
_internal = APIRouter()


@_internal.get("/jobs/{job_id}")
async def job(job_id: UUID, conn: Conn) -> dict[str, Any]:
    row = await jobs.job_row(conn, job_id)
    if row is None:
        raise HTTPException(404, detail="job not found")
    return row


@_internal.get("/attempts/{attempt_id}")
async def attempt(
    attempt_id: UUID,
    conn: Conn,
    job_id: Annotated[UUID | None, Query(description="The attempt's job (faster).")] = None,
) -> dict[str, Any]:
    """Whether an attempt is still the one its job waits for. Generators ask just
    before they call the model, so that an attempt of a job cancelled (or of one that
    moved on) while it waited in the work queue costs no model call."""
    standing = await jobs.attempt_standing(conn, attempt_id, job_id)
    if standing is None:
        raise HTTPException(404, detail="attempt not found")
    return {
        "attempt_id": standing.attempt_id,
        "job_id": standing.job_id,
        "current": standing.current,
        "status": standing.status,
    }


@_internal.get("/jobs/{job_id}/events")
async def job_events(job_id: UUID, conn: Conn) -> dict[str, Any]:
    history = await load(conn, job_id)
    if not history:
        raise HTTPException(404, detail="job not found")
    return {
        "job_id": job_id,
        "events": [
            {
                "type": item.envelope.type,
                "version": item.version,
                "position": item.position,
                "occurred_at": item.envelope.occurred_at,
                "data": item.envelope.data,
                "event_id": item.envelope.event_id,
                "correlation_id": item.envelope.correlation_id,
                "causation_id": item.envelope.causation_id,
                "user_id": item.envelope.user_id,
                "canvas_id": item.envelope.canvas_id,
            }
            for item in history
        ],
    }


class PermitRequest(BaseModel):
    """A generator about to call ``model`` for a run of an attempt."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    attempt_id: UUID
    run_id: UUID
    estimated_tokens: int = Field(default=0, ge=0, le=10_000_000)


class UsageReport(BaseModel):
    """What a run's model call used (its permit then counts that, not the estimate)."""

    model_config = ConfigDict(extra="forbid")

    attempt_id: UUID
    run_id: UUID
    tokens: int = Field(ge=0, le=10_000_000)


class PauseRequest(BaseModel):
    """The model answered 429 with Retry-After: the whole fleet waits that long."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    seconds: float = Field(gt=0, le=3_600)


@_internal.post("/model-budget/permits")
async def model_permit(body: PermitRequest, conn: Conn, request: Request) -> dict[str, Any]:
    """May this call go to the model now (the fleet's budget, docs/api.md)? Asked by a
    generator just before each model call while a budget is set."""
    limits: budget.Budget = request.app.state.model_budget
    async with conn.transaction():
        permit = await budget.acquire(
            conn,
            body.model,
            limits,
            attempt_id=body.attempt_id,
            run_id=body.run_id,
            estimated_tokens=body.estimated_tokens,
        )
    metrics: Metrics = request.app.state.metrics
    metrics.model_permits.labels("granted" if permit.granted else permit.reason or "").inc()
    return {
        "granted": permit.granted,
        "retry_in_seconds": permit.retry_in_seconds,
        "reason": permit.reason,
        "until": permit.until,
    }


@_internal.post("/model-budget/usage", status_code=204)
async def model_usage(body: UsageReport, conn: Conn) -> None:
    """The tokens a granted call used."""
    await budget.settle(conn, attempt_id=body.attempt_id, run_id=body.run_id, tokens=body.tokens)


@_internal.post("/model-budget/pauses")
async def model_pause(body: PauseRequest, conn: Conn, request: Request) -> dict[str, Any]:
    """Hold every permit of the model for ``seconds`` (a 429's Retry-After)."""
    until = await budget.pause(conn, body.model, body.seconds)
    metrics: Metrics = request.app.state.metrics
    metrics.model_pauses.inc()
    return {"model": body.model, "paused_until": until}


class GeneratorHeartbeat(BaseModel):
    """What a generator process announces of itself, every few seconds (fair dispatch)."""

    model_config = ConfigDict(extra="forbid")

    generator_id: str = Field(min_length=1, max_length=200)
    capacity: int = Field(ge=0, le=100_000)
    running: int = Field(default=0, ge=0, le=100_000)


@_internal.post("/generators/heartbeat", status_code=204)
async def generator_heartbeat(body: GeneratorHeartbeat, conn: Conn) -> None:
    """A generator is alive and can run ``capacity`` attempts at once (its
    MAX_CONCURRENT_JOBS; 0 as it stops): the fleet's capacity for fair dispatch is the
    sum over the generators heard from in the last 15 s."""
    await dispatch.heartbeat(conn, body.generator_id, body.capacity, body.running, utcnow())
