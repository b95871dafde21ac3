"""For operators and orchestrators of containers: liveness, readiness, metrics, the
system's health as the gateway sees it, and a debug view for admins."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse

from canvas_events.ops import metrics_payload
from canvas_events.runtime import instance_id
from canvas_gateway.deps import (
    AdminUser,
    BrokerDep,
    MetricsDep,
    ReadinessDep,
    SettingsDep,
    StoreDep,
)
from canvas_gateway.errors import StoreUnavailable
from canvas_gateway.routes import error_responses
from canvas_gateway.schemas import HealthPublic, JobProcessor
from canvas_gateway.settings import Settings

router = APIRouter(tags=["ops"])


@router.get("/health", summary="Alive", description="200 while the process runs.")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Ready to serve",
    description="200 when the database and the broker answer, else 503 with the reasons.",
    responses={503: {"description": "Not ready; `checks` says why."}},
)
async def ready(readiness: ReadinessDep) -> JSONResponse:
    ok, checks = await readiness.report()
    if ok:
        return JSONResponse({"status": "ready", "checks": checks})
    reasons = "; ".join(reason for reason in checks.values() if reason != "ok")
    return JSONResponse(
        {"status": "not ready", "detail": reasons, "checks": checks},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    payload, content_type = metrics_payload(metrics.registry)
    return Response(payload, media_type=content_type)


@router.get(
    "/api/ai-agent/health",
    summary="The job system's health",
    description="`unhealthy` (503) when the database or the broker is away; `degraded` "
    "(200) when no generator or no orchestrator consumes its queue.",
    responses={503: {"model": HealthPublic, "description": "The database or broker is away."}},
)
async def system_health(store: StoreDep, broker: BrokerDep) -> JSONResponse:
    topology = broker.topology
    database = await store.check() or "ok"
    broker_state = "ok" if broker.connected else f"broker: {broker.last_error}"
    work = await broker.queue_stats(topology.generator_work.name)
    orchestrator = await broker.queue_stats(topology.orchestrator.name)
    issues = [reason for reason in (database, broker_state) if reason != "ok"]
    if work is not None and work[1] == 0:
        issues.append("no generator consumes the work queue")
    if orchestrator is not None and orchestrator[1] == 0:
        issues.append("no orchestrator consumes its queue")
    if database != "ok" or broker_state != "ok":
        state = "unhealthy"
    elif issues:
        state = "degraded"
    else:
        state = "healthy"
    body = HealthPublic(
        status=state,
        database=database,
        broker=broker_state,
        job_processor=JobProcessor(
            work_queue=topology.generator_work.name,
            queued_messages=work[0] if work else None,
            generator_consumers=work[1] if work else None,
            orchestrator_consumers=orchestrator[1] if orchestrator else None,
        ),
        issues=issues,
    )
    code = status.HTTP_503_SERVICE_UNAVAILABLE if state == "unhealthy" else status.HTTP_200_OK
    return JSONResponse(body.model_dump(mode="json"), status_code=code)


@router.get(
    "/api/ai-agent/debug/environment",
    summary="Queues, consumers, recent jobs (admins)",
    description="Never shows a secret: no password, key or token.",
    responses=error_responses(401, 403),
)
async def debug_environment(
    _: AdminUser, store: StoreDep, broker: BrokerDep, settings: SettingsDep
) -> dict[str, Any]:
    topology = broker.topology
    queues = []
    names = [spec.name for spec in topology.durable_queues] + list(topology.dead_letter_queues)
    for name in names:
        stats = await broker.queue_stats(name)
        queues.append(
            {
                "name": name,
                "messages": stats[0] if stats else None,
                "consumers": stats[1] if stats else None,
            }
        )
    jobs: dict[str, Any] = {}
    try:
        jobs["by_status"] = await store.job_counts()
        jobs["recent"] = await store.recent_jobs(20)
    except StoreUnavailable as exc:
        jobs["error"] = str(exc)
    return {
        "service": "gateway",
        "instance": instance_id("gateway"),
        "database": await store.check() or "ok",
        "broker": "ok" if broker.connected else f"broker: {broker.last_error}",
        "queues": queues,
        "jobs": jobs,
        "settings": safe_settings(settings),
    }


def safe_settings(settings: Settings) -> dict[str, Any]:
    """The settings an operator may see: where things are, never how to get in."""
    return {
        "database": _where(settings.database_url.get_secret_value()),
        "broker": _where(settings.amqp_url.get_secret_value()),
        "amqp_topology_prefix": settings.amqp_topology_prefix,
        "gateway_port": settings.gateway_port,
        "max_active_jobs_per_user": settings.max_active_jobs_per_user,
        "publish_timeout_seconds": settings.publish_timeout_seconds,
        "log_level": settings.log_level,
        "log_format": settings.log_format,
        "jwt_secret_is_default": settings.jwt_secret_is_default,
    }


def _where(url: str) -> str:
    """Scheme, host, port and path of a URL, without user or password."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable>"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"
