"""Health, readiness and metrics plumbing every service shares (ARCHITECTURE.md 1, 9).

``/health`` answers 200 while the process runs; ``/ready`` answers 200 only when every
registered check passes, else 503 with each failing check's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)

from canvas_events.broker import Broker
from canvas_events.postgres import Database

Check = Callable[[], Awaitable[str | None]]


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


_default_registry_renamed = False


def _canvas_names_only() -> None:
    """Every metric name starts with ``canvas_`` (ARCHITECTURE.md 9): the default
    registry's python_*/process_* collectors give way to ``canvas_process_*``."""
    global _default_registry_renamed
    if _default_registry_renamed:
        return
    _default_registry_renamed = True
    for collector in (
        prometheus_client.PROCESS_COLLECTOR,
        prometheus_client.PLATFORM_COLLECTOR,
        prometheus_client.GC_COLLECTOR,
    ):
        with contextlib.suppress(KeyError):  # already gone
            REGISTRY.unregister(collector)
    ProcessCollector(namespace="canvas", registry=REGISTRY)


def metrics_payload(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    if registry is REGISTRY:
        _canvas_names_only()
    return generate_latest(registry), CONTENT_TYPE_LATEST
