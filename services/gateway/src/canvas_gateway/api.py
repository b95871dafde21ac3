"""The gateway's HTTP app: ``create_app(service)`` builds it over a
:class:`~canvas_gateway.service.Service`, whose parts its lifespan starts and stops:
middleware, error answers and routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import structlog
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from canvas_events.errors import PublishError
from canvas_gateway.errors import StoreNotReady, StoreUnavailable
from canvas_gateway.metrics import Metrics
from canvas_gateway.middleware import RequestLimits, RequestMiddleware, RequestSpans
from canvas_gateway.routes import admin, canvas, jobs, ops, page, usage

if TYPE_CHECKING:
    from canvas_gateway.service import Service

log = structlog.get_logger("canvas_gateway")

_DESCRIPTION = """\
The public REST API of canvas-jobs: ask for a drawing, follow its job, read the canvas.

Every call but the ops endpoints needs `Authorization: Bearer <JWT>` (HS256, `sub` is
the user). A user sees only their own jobs and canvases: anything else answers 404.
Every answer carries `X-Request-ID` (the one sent, when valid, else a new one); it is
the correlation id in every service's logs. Live progress comes over the notifier's
WebSocket.
"""

DOCS_ASSETS = "/docs-assets"
_TAGS = [
    {"name": "jobs", "description": "Create jobs and follow them."},
    {"name": "canvas", "description": "What completed jobs drew."},
    {"name": "admin", "description": "Every user's jobs and events, for operators (admin role)."},
    {"name": "ops", "description": "Health, readiness, metrics and debugging."},
]


def create_app(service: Service) -> FastAPI:
    """The gateway app over ``service``; nothing connects until its lifespan starts."""
    settings = service.settings

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    # FastAPI's /docs and /redoc load Swagger UI and ReDoc from a CDN: a blank page
    # offline. These serve the same pages with the assets fastapi-offline ships.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="canvas-jobs gateway",
        version="0.1.0",
        description=_DESCRIPTION,
        openapi_tags=_TAGS,
        lifespan=lifespan,
        # FastAPI's own spans, metrics and logs off: a request is one span, RequestSpans'
        # (docs/operations.md, "Traces"), and the metrics are ours.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.store = service.store
    app.state.ledger = service.ledger
    app.state.broker = service.broker
    app.state.publisher = service.publisher
    app.state.metrics = service.metrics
    # Added first, so inside RequestMiddleware: its 401s and 413s are logged and counted.
    app.add_middleware(RequestLimits, secret=settings.secret, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMiddleware, metrics=service.metrics, routes=app.router.routes)
    # Outermost: the access log line is written inside the request's span.
    app.add_middleware(RequestSpans, routes=app.router.routes)
    _add_error_handlers(app, service.metrics)
    app.include_router(jobs.router)
    app.include_router(usage.router)
    app.include_router(canvas.router)
    app.include_router(admin.router)
    app.include_router(ops.probes(service.readiness, service.metrics.registry))
    app.include_router(ops.router)
    app.include_router(page.router)
    return app


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input (a 2,000-character query, say).
        issues = [
            {
                "loc": list(err.get("loc", ())),
                "msg": err.get("msg", ""),
                "type": err.get("type", ""),
            }
            for err in exc.errors()
        ]
        return JSONResponse({"detail": issues}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(StoreNotReady)
    async def store_not_ready(_: Request, exc: StoreNotReady) -> JSONResponse:
        return _service_unavailable(str(exc))

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("database unavailable", error=str(exc))
        return _service_unavailable("the database is unavailable; try again later")

    @app.exception_handler(PublishError)
    async def publish_failed(_: Request, exc: PublishError) -> JSONResponse:
        metrics.publish_failures.inc()
        log.warning("broker did not confirm", error=str(exc))
        return _service_unavailable("the job queue is unavailable; try again later")


def _service_unavailable(detail: str) -> JSONResponse:
    return JSONResponse(
        {"detail": detail},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )
