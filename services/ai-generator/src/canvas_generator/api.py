"""The ai-generator's HTTP side: health, readiness and metrics only (it takes its work
from the broker)."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from canvas_events.ops import Probes, Readiness


def create_app(readiness: Readiness, registry: CollectorRegistry) -> FastAPI:
    """The FastAPI app serving /health, /ready and /metrics."""
    app = FastAPI(
        title="canvas-jobs ai-generator",
        docs_url=None,
        redoc_url=None,
        # FastAPI's own spans, metrics and logs off (docs/operations.md, "Traces").
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.include_router(Probes(readiness, registry).router())
    return app
