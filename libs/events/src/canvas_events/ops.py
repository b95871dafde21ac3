"""Health, readiness and metrics, answered the same way by every service.

``/health`` answers 200 while the process runs; ``/ready`` answers 200 only when every
registered check passes, else 503 with each failing check's reason; ``/metrics`` is the
Prometheus text of the service's own registry. :class:`Probes` holds these answers once,
for the FastAPI services (:meth:`Probes.router`) and for the notifier's websockets server,
which answers plain HTTP itself (:meth:`Probes.answer`), so that an operator, a load
balancer or Kubernetes reads the same shapes from all four (docs/api.md, docs/operations.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from canvas_events.broker import Broker
from canvas_events.postgres import Database

if TYPE_CHECKING:
    from fastapi import APIRouter, Response

Check = Callable[[], Awaitable[str | None]]
# Run before each /metrics answer: sets the gauges sampled at scrape time.
Refresh = Callable[[], Awaitable[None]]


class Readiness:
    """Named checks; each returns None when fine or a reason when not."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        """Register a check under ``name``."""
        self._checks[name] = check

    def add_database(self, database: Database) -> None:
        """Ready only when ``SELECT 1`` answers."""
        self.add("database", database.check)

    def add_broker(self, broker: Broker) -> None:
        """Ready only when the broker connection and its consumers are up."""

        async def check() -> str | None:
            return None if broker.connected else f"broker: {broker.last_error}"

        self.add("broker", check)

    async def report(self) -> tuple[bool, dict[str, str]]:
        """(all passed, {check name: "ok" or the reason})."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._checks[name]() for name in names))
        report = {name: result or "ok" for name, result in zip(names, results, strict=True)}
        return all(result is None for result in results), report


def new_registry() -> CollectorRegistry:
    """A registry for one service instance (tests run several in one process), with the
    process's own metrics as ``canvas_process_*`` in every service: every name starts
    with ``canvas_``."""
    registry = CollectorRegistry()
    ProcessCollector(namespace="canvas", registry=registry)
    return registry


class MetricSet:
    """The base of each service's ``Metrics``: a registry of its own per instance (tests
    run several services in one process) and the metrics declared on it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()

    def counter(self, name: str, doc: str, *, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, *, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def histogram(
        self, name: str, doc: str, *, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)


def metrics_payload(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class Answer(NamedTuple):
    """A probe's HTTP answer."""

    status: HTTPStatus
    body: bytes
    content_type: str


READY_DESCRIPTION = "200 when every readiness check passes, else 503 with the reasons."


class Probes:
    """``/health``, ``/ready`` and ``/metrics`` of one service, over its readiness checks
    and its own metrics registry (one per service instance, so that tests can run several
    in one process). ``refresh``, when given, runs before each ``/metrics`` answer."""

    def __init__(
        self,
        readiness: Readiness,
        registry: CollectorRegistry,
        *,
        refresh: Refresh | None = None,
    ) -> None:
        self._readiness = readiness
        self._registry = registry
        self._refresh = refresh

    async def answer(self, path: str) -> Answer | None:
        """The answer to a GET of ``path``; None when ``path`` is not a probe."""
        if path == "/health":
            return _json(HTTPStatus.OK, {"status": "ok"})
        if path == "/ready":
            return await self._ready()
        if path == "/metrics":
            return await self._metrics()
        return None

    async def _ready(self) -> Answer:
        ok, checks = await self._readiness.report()
        if ok:
            return _json(HTTPStatus.OK, {"status": "ready", "checks": checks})
        # One line a probe's log or a load balancer's status page can show as it is.
        reasons = "; ".join(reason for reason in checks.values() if reason != "ok")
        body = {"status": "not ready", "detail": reasons, "checks": checks}
        return _json(HTTPStatus.SERVICE_UNAVAILABLE, body)

    async def _metrics(self) -> Answer:
        if self._refresh is not None:
            await self._refresh()
        payload, content_type = metrics_payload(self._registry)
        return Answer(HTTPStatus.OK, payload, content_type)

    def router(
        self,
        *,
        tags: list[str | Enum] | None = None,
        ready_description: str = READY_DESCRIPTION,
    ) -> APIRouter:
        """The three probes as FastAPI routes, documented for the app's OpenAPI page
        (the gateway's is public)."""
        # Imported here, as the notifier runs without FastAPI. So each route says
        # response_model=None: FastAPI cannot resolve an annotation of a local import.
        from fastapi import APIRouter, Response

        router = APIRouter(tags=tags)
        routes = (
            ("/health", "Alive", "200 while the process runs.", _HEALTH_RESPONSES),
            ("/ready", "Ready to serve", ready_description, _READY_RESPONSES),
            (
                "/metrics",
                "Prometheus metrics",
                "Prometheus text; every name starts with `canvas_`.",
                _METRICS_RESPONSES,
            ),
        )

        def endpoint(path: str) -> Callable[[], Awaitable[Response]]:
            async def probe() -> Response:
                answer = await self.answer(path)
                assert answer is not None  # every route here is a probe
                return Response(answer.body, answer.status, media_type=answer.content_type)

            return probe

        for path, summary, description, responses in routes:
            router.add_api_route(
                path,
                endpoint(path),
                methods=["GET"],
                name=path.strip("/"),
                summary=summary,
                description=description,
                response_class=Response,
                response_model=None,
                responses=responses,
            )
        return router


def _json(status: HTTPStatus, body: dict[str, Any]) -> Answer:
    return Answer(status, orjson.dumps(body), "application/json")


def _example(description: str, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI response entry: a JSON answer and an example of it."""
    return {"description": description, "content": {"application/json": {"example": body}}}


# What each probe's OpenAPI entry shows of its answers.
_HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {200: _example("Alive.", {"status": "ok"})}
_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _example("Ready.", {"status": "ready", "checks": {"broker": "ok"}}),
    503: _example(
        "Not ready; `checks` says why.",
        {
            "status": "not ready",
            "detail": "broker: connection refused",
            "checks": {"broker": "broker: connection refused"},
        },
    ),
}
_METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text.", "content": {"text/plain": {}}}
}
