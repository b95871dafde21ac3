"""The ASGI middlewares around every request:

- :class:`RequestSpans` (outermost): when traces are on, a server span per API request,
  the root of the trace of what it publishes (a job's trace, for a create-canvas);
- :class:`RequestMiddleware`: the request id, the access log line and the HTTP metrics;
- :class:`RequestLimits`: before any route reads a body, a request to the API without a
  valid bearer token is answered 401, and one whose body is over MAX_REQUEST_BYTES 413:
  from its Content-Length without reading any of it (and the connection closed), else
  as soon as the limit is passed (uvicorn then drops the rest of the stream unread into
  memory, so that the client still gets its answer). A hostile body costs the gateway
  at most MAX_REQUEST_BYTES of memory.

Plain ASGI middlewares rather than Starlette's BaseHTTPMiddleware: they see the
response's status and headers without buffering the body, and structlog context they
bind is visible to the endpoint (same task).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from uuid import uuid4

import structlog
from opentelemetry.trace import SpanKind
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from canvas_events import tracing
from canvas_events.auth import decode_token
from canvas_events.envelope import CORRELATION_ID_PATTERN
from canvas_events.errors import AuthError
from canvas_gateway.metrics import Metrics

log = structlog.get_logger("canvas_gateway.access")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(CORRELATION_ID_PATTERN)
# Paths that match no route are one label, so that scanners cannot grow the metrics.
_UNMATCHED = "<unmatched>"


class RequestSpans:
    """A server span around each request to the API (not its health probe), when traces
    are on: named by its route, with its method, status, correlation id and job.

    A request's own ``traceparent`` header is not followed: the gateway is the public
    edge, and a job's trace starts at the request that made it, as a new trace (the
    correlation id is what a client knows its request by)."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        traced = scope["type"] == "http" and tracing.enabled()
        if not traced or not path.startswith("/api/") or path in PUBLIC_API_PATHS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": path}
        with tracing.span(method, kind=SpanKind.SERVER, root=True, attributes=attributes) as span:
            try:
                await self.app(scope, receive, send_with_status)
            finally:
                route = _route_label(scope, self.routes)
                state = scope.get("state", {})
                job_id = state.get("job_id") or scope.get("path_params", {}).get("job_id")
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                span.set_attribute("canvas.correlation_id", state.get("correlation_id", ""))
                if job_id:
                    span.set_attribute("canvas.job_id", str(job_id))
                if status >= 500:
                    tracing.failed(span, f"answered {status}")


class RequestMiddleware:
    """Takes X-Request-ID (or makes one) as the correlation id, echoes it on every
    answer, logs one line per request and counts it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        # To label a request answered before routing (a 401, a 413) by its route too.
        self.routes = routes

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
            route = _route_label(scope, self.routes)
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


# The API's routes that anyone may call; every other /api/ route needs a token.
PUBLIC_API_PATHS = frozenset({"/api/ai-agent/health"})
MISSING_TOKEN = "missing bearer token: send Authorization: Bearer <token>"  # noqa: S105 (a message)


class RequestLimits:
    """401 before the body of an API request without a valid token is read; 413 for a
    body over ``max_bytes``. The caller a token names is left in the request's state
    (``principal``) for the routes' own dependency, which then decodes nothing again."""

    def __init__(self, app: ASGIApp, *, secret: str, max_bytes: int) -> None:
        self.app = app
        self.secret = secret
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        if path.startswith("/api/") and path not in PUBLIC_API_PATHS:
            try:
                principal = decode_token(_bearer_token(headers.get("authorization")), self.secret)
            except AuthError as exc:
                challenge = {"WWW-Authenticate": "Bearer"}
                await _answer(scope, receive, send, 401, str(exc), challenge, close=True)
                return
            scope.setdefault("state", {})["principal"] = principal
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _answer(scope, receive, send, 413, self._too_large(), close=True)
            return

        received = 0
        started = refused = False

        async def limited_receive() -> Message:
            # Past the limit: answer 413 at once, and tell the route the client left, so
            # that it reads no further (whatever it answers then is dropped).
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not started:
                    refused = True
                    await _answer(scope, receive, send, 413, self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracked_send)

    def _too_large(self) -> str:
        return f"request body over {self.max_bytes} bytes (MAX_REQUEST_BYTES)"


def _bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(MISSING_TOKEN)
    return token.strip()


async def _answer(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    close: bool = False,
) -> None:
    """Answer with ``{"detail": ...}``; with ``close``, the connection closes after the
    answer, so that not a byte more of the body is read."""
    headers = {**(headers or {}), **({"Connection": "close"} if close else {})}
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await response(scope, receive, send)


def _route_label(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route's path template; FastAPI's own pages (/docs, /openapi.json) have no
    template but a fixed path, and anything unmatched is one label. A request answered
    before routing (RequestLimits) is matched here."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return str(template)
    if "endpoint" in scope:
        return str(scope["path"])
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", scope["path"]))
    return _UNMATCHED
