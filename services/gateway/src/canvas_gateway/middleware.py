"""One ASGI middleware around every request: the request id, the access log line and
the HTTP metrics.

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware: it sees the
response's status and headers without buffering the body, and structlog context it
binds is visible to the endpoint (same task).
"""

from __future__ import annotations

import re
import time
from uuid import uuid4

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from canvas_events.envelope import CORRELATION_ID_PATTERN
from canvas_gateway.metrics import Metrics

log = structlog.get_logger("canvas_gateway.access")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(CORRELATION_ID_PATTERN)
# Paths that match no route are one label, so that scanners cannot grow the metrics.
_UNMATCHED = "<unmatched>"


class RequestMiddleware:
    """Takes X-Request-ID (or makes one) as the correlation id, echoes it on every
    answer, logs one line per request and counts it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER)
        correlation_id = incoming if incoming and _VALID_ID.match(incoming) else uuid4().hex
        state = scope.setdefault("state", {})
        state["correlation_id"] = correlation_id
        # Each request runs in its own task, so this touches no other request's context.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(correlation_id=correlation_id)

        status = 500
        started = False
        began = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = correlation_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request failed")
            if started:
                raise
            status = 500
            # Answered here, inside the request id's reach, rather than by Starlette's
            # outer error middleware, which would drop the X-Request-ID header.
            response = JSONResponse(
                {"detail": "internal error"},
                status_code=500,
                headers={REQUEST_ID_HEADER: correlation_id},
            )
            await response(scope, receive, send)
        finally:
            elapsed = time.perf_counter() - began
            route = _route_label(scope)
            method = scope["method"]
            self.metrics.http_requests.labels(method, route, str(status)).inc()
            self.metrics.http_seconds.labels(route).observe(elapsed)
            job_id = state.get("job_id") or scope.get("path_params", {}).get("job_id")
            log.info(
                "request",
                method=method,
                route=route,
                path=scope["path"],
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                job_id=str(job_id) if job_id else None,
            )


def _route_label(scope: Scope) -> str:
    """The route's path template; FastAPI's own pages (/docs, /openapi.json) have no
    template but a fixed path, and anything unmatched is one label."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return str(template)
    return str(scope["path"]) if "endpoint" in scope else _UNMATCHED
