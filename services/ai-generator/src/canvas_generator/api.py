"""The ai-generator's HTTP side: health, readiness and metrics only (it takes its work
from the broker)."""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from canvas_events.ops import Readiness, metrics_payload


def create_app(readiness: Readiness) -> FastAPI:
    """The FastAPI app serving /health, /ready and /metrics."""
    app = FastAPI(title="canvas-jobs ai-generator", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok, checks = await readiness.report()
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": checks},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        payload, content_type = metrics_payload()
        return Response(payload, media_type=content_type)

    return app
