"""For operators and orchestrators of containers: liveness, readiness, metrics, the
system's health as the gateway sees it, and a debug view for admins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from canvas_events.broker import Broker
from canvas_events.ops import Probes, Readiness
from canvas_events.runtime import instance_id
from canvas_gateway.deps import AdminUser, BrokerDep, SettingsDep, StoreDep
from canvas_gateway.errors import StoreNotReady, StoreUnavailable
from canvas_gateway.routes import error_responses
from canvas_gateway.schemas import HealthPublic, JobProcessor
from canvas_gateway.settings import Settings
from canvas_gateway.store import Backlog, Store

router = APIRouter(tags=["ops"])
_READY = "200 when the database and the broker answer, else 503 with the reasons."


def probes(readiness: Readiness, registry: CollectorRegistry) -> APIRouter:
    """/health, /ready and /metrics, answered as every service answers them."""
    return Probes(readiness, registry).router(tags=["ops"], ready_description=_READY)


# The reasons in `issues` (docs/operations.md lists what to do about each; tests and
# alerts may match on their beginnings).
NO_GENERATOR = "no generator consumes the work queue"
NO_ORCHESTRATOR = "no orchestrator consumes its queue"
QUEUED_TOO_LONG = "the oldest queued job has waited"
OUTBOX_BEHIND = "the outbox relay is"
OUTBOX_STALE = "the oldest unpublished event has waited"
DEAD_LETTERS = "dead letters wait"


@dataclass(frozen=True)
class _Health:
    state: Literal["healthy", "degraded", "unhealthy"]
    database: str
    broker: str
    work: tuple[int, int] | None  # (messages ready, consumers)
    orchestrator: tuple[int, int] | None
    backlog: Backlog | None
    issues: list[str]


async def _health(store: Store, broker: Broker, settings: Settings) -> _Health:
    """The system as the gateway sees it: connections, consumers, and how long work waits."""
    topology = broker.topology
    database = await store.check() or "ok"
    broker_state = "ok" if broker.connected else f"broker: {broker.last_error}"
    work = await broker.queue_stats(topology.generator_work.name)
    orchestrator = await broker.queue_stats(topology.orchestrator.name)
    issues: list[str] = []
    backlog = None
    if database == "ok":
        try:
            backlog = await store.backlog()
        except StoreNotReady as exc:
            issues.append(str(exc))
        except StoreUnavailable as exc:
            database = str(exc)
    issues[:0] = [reason for reason in (database, broker_state) if reason != "ok"]
    if work is not None and work[1] == 0:
        issues.append(NO_GENERATOR)
    if orchestrator is not None and orchestrator[1] == 0:
        issues.append(NO_ORCHESTRATOR)
    if backlog is not None:
        issues += _backlog_issues(backlog, settings)
    issues += await _dead_letter_issues(broker)
    if database != "ok" or broker_state != "ok":
        state: Literal["healthy", "degraded", "unhealthy"] = "unhealthy"
    elif issues:
        state = "degraded"
    else:
        state = "healthy"
    return _Health(state, database, broker_state, work, orchestrator, backlog, issues)


def _backlog_issues(backlog: Backlog, settings: Settings) -> list[str]:
    issues = []
    age = backlog.oldest_queued_age_seconds
    if age is not None and age > settings.health_queued_age_seconds:
        issues.append(
            f"{QUEUED_TOO_LONG} {age:.0f} s (threshold {settings.health_queued_age_seconds:g} s)"
        )
    if backlog.outbox_lag > settings.health_outbox_lag_events:
        issues.append(
            f"{OUTBOX_BEHIND} {backlog.outbox_lag} events behind "
            f"(threshold {settings.health_outbox_lag_events})"
        )
    unpublished = backlog.oldest_unpublished_age_seconds
    if unpublished is not None and unpublished > settings.health_outbox_age_seconds:
        issues.append(
            f"{OUTBOX_STALE} {unpublished:.0f} s "
            f"(threshold {settings.health_outbox_age_seconds:g} s)"
        )
    return issues


async def _dead_letter_issues(broker: Broker) -> list[str]:
    """One issue per .dlq that holds messages: nothing is stuck, but each one is a message
    a consumer gave up on, waiting for an operator (`dlq list`, `replay` or `drop`)."""
    issues = []
    for name in broker.topology.dead_letter_queues:
        stats = await broker.queue_stats(name)
        if stats is not None and stats[0] > 0:
            issues.append(f"{DEAD_LETTERS} in {name}: {stats[0]} message(s)")
    return issues


def _job_processor(health: _Health, work_queue: str) -> JobProcessor:
    backlog = health.backlog
    return JobProcessor(
        work_queue=work_queue,
        queued_messages=health.work[0] if health.work else None,
        generator_consumers=health.work[1] if health.work else None,
        orchestrator_consumers=health.orchestrator[1] if health.orchestrator else None,
        oldest_queued_age_seconds=backlog.oldest_queued_age_seconds if backlog else None,
        outbox_lag=backlog.outbox_lag if backlog else None,
        oldest_unpublished_age_seconds=(
            backlog.oldest_unpublished_age_seconds if backlog else None
        ),
    )


@router.get(
    "/api/ai-agent/health",
    summary="The job system's health",
    description="`unhealthy` (503) when the database or the broker is away. `degraded` "
    "(200) when no generator or no orchestrator consumes its queue, when the oldest queued "
    "job has waited longer than HEALTH_QUEUED_AGE_SECONDS, or when the orchestrator's relay "
    "lags (more than HEALTH_OUTBOX_LAG_EVENTS events, or one older than "
    "HEALTH_OUTBOX_AGE_SECONDS), or while a dead-letter queue (`.dlq`) holds messages. "
    "`issues` says why; docs/operations.md what to do.",
    responses={503: {"model": HealthPublic, "description": "The database or broker is away."}},
)
async def system_health(store: StoreDep, broker: BrokerDep, settings: SettingsDep) -> JSONResponse:
    health = await _health(store, broker, settings)
    body = HealthPublic(
        status=health.state,
        database=health.database,
        broker=health.broker,
        job_processor=_job_processor(health, broker.topology.generator_work.name),
        issues=health.issues,
    )
    code = (
        status.HTTP_503_SERVICE_UNAVAILABLE if health.state == "unhealthy" else status.HTTP_200_OK
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=code)


@router.get(
    "/api/ai-agent/debug/environment",
    summary="Queues, consumers, recent jobs (admins)",
    description="The health answer's figures, the consumers of each queue, every queue's "
    "depth (dead-letter queues included), job counts by status and the 20 newest jobs "
    "with their last error. Never shows a secret: no password, key or token.",
    responses=error_responses(401, 403),
)
async def debug_environment(
    _: AdminUser, store: StoreDep, broker: BrokerDep, settings: SettingsDep
) -> dict[str, Any]:
    topology = broker.topology
    health = await _health(store, broker, settings)
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
        "status": health.state,
        "issues": health.issues,
        "database": health.database,
        "broker": health.broker,
        # Who takes work off each shared queue. Notifiers and generators' control queues
        # are one exclusive queue per process, named by instance: AMQP cannot list them
        # (the management UI can, under <prefix>.notifier.*).
        "processors": {
            "generators": {
                "queue": topology.generator_work.name,
                "consumers": health.work[1] if health.work else None,
            },
            "orchestrators": {
                "queue": topology.orchestrator.name,
                "consumers": health.orchestrator[1] if health.orchestrator else None,
            },
        },
        "job_processor": _job_processor(health, topology.generator_work.name).model_dump(
            mode="json"
        ),
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
        "health_queued_age_seconds": settings.health_queued_age_seconds,
        "health_outbox_lag_events": settings.health_outbox_lag_events,
        "health_outbox_age_seconds": settings.health_outbox_age_seconds,
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
