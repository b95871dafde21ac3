"""The gateway's ASGI app: ``create_app(settings)`` wires the resources and routes,
its lifespan connects them, ``serve`` runs it until told to stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from canvas_events.broker import Broker
from canvas_events.errors import PublishError
from canvas_events.ops import Readiness
from canvas_events.postgres import Database
from canvas_events.runtime import instance_id, serve_http
from canvas_gateway.errors import StoreNotReady, StoreUnavailable
from canvas_gateway.ledger import LedgerSweep
from canvas_gateway.metrics import Metrics
from canvas_gateway.middleware import RequestLimits, RequestMiddleware
from canvas_gateway.routes import canvas, jobs, ops, page
from canvas_gateway.settings import Settings
from canvas_gateway.store import Store, create_ledger, init_connection

log = structlog.get_logger("canvas_gateway")

_DESCRIPTION = """\
The public REST API of canvas-jobs: ask for a drawing, follow its job, read the canvas.

Every call but the ops endpoints needs `Authorization: Bearer <JWT>` (HS256, `sub` is
the user). A user sees only their own jobs and canvases: anything else answers 404.
Every answer carries `X-Request-ID` (the one sent, when valid, else a new one); it is
the correlation id in every service's logs. Live progress comes over the notifier's
WebSocket.
"""

_TAGS = [
    {"name": "jobs", "description": "Create jobs and follow them."},
    {"name": "canvas", "description": "What completed jobs drew."},
    {"name": "ops", "description": "Health, readiness, metrics and debugging."},
]


def create_app(settings: Settings) -> FastAPI:
    """The gateway app; nothing connects until its lifespan starts."""
    database = Database(
        settings.database_url.get_secret_value(),
        min_size=1,
        max_size=10,
        on_connect=create_ledger,
        init=init_connection,
    )
    broker = Broker(
        settings.amqp_url.get_secret_value(),
        settings.topology,
        connection_name=instance_id("gateway"),
        publish_timeout=settings.publish_timeout_seconds,
    )
    store = Store(database)
    sweep = LedgerSweep(
        store,
        broker,
        resend_after=settings.ledger_resend_after_seconds,
        max_resends=settings.ledger_max_resends,
    )
    metrics = Metrics()
    readiness = Readiness()
    readiness.add_database(database)
    readiness.add_broker(broker)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.jwt_secret_is_default:
            log.warning(
                "JWT_SECRET IS NOT SET: using the public development secret; anyone can "
                "mint tokens. Set JWT_SECRET outside development."
            )
        # Both connect in the background: the gateway serves /health before they are up.
        await database.start()
        await broker.start()
        await sweep.start()
        try:
            yield
        finally:
            await sweep.stop()
            await broker.stop(drain_timeout=settings.shutdown_grace_seconds)
            await database.stop()

    app = FastAPI(
        title="canvas-jobs gateway",
        version="0.1.0",
        description=_DESCRIPTION,
        openapi_tags=_TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.ledger = sweep
    app.state.broker = broker
    app.state.metrics = metrics
    app.state.readiness = readiness
    # Added first, so inside RequestMiddleware: its 401s and 413s are logged and counted.
    app.add_middleware(RequestLimits, secret=settings.secret, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMiddleware, metrics=metrics, routes=app.router.routes)
    _add_error_handlers(app, metrics)
    app.include_router(jobs.router)
    app.include_router(canvas.router)
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


async def serve(
    settings: Settings, stop: asyncio.Event, *, host: str = "0.0.0.0", port: int | None = None
) -> None:
    """Run the gateway until ``stop`` is set, then drain and close its connections."""
    app = create_app(settings)
    # serve_http runs uvicorn with lifespan="off": the service runs its own lifespan.
    async with app.router.lifespan_context(app):
        port = settings.gateway_port if port is None else port
        log.info("gateway listening", host=host, port=port)
        await serve_http(app, port, stop, host=host)
