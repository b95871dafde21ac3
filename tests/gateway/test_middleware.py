"""The request middleware: an unexpected error still answers JSON with the request id."""

from __future__ import annotations

import httpx

from canvas_gateway.api import create_app
from canvas_gateway.service import Service
from canvas_gateway.settings import Settings
from tests.gateway.conftest import JWT_SECRET


async def test_unhandled_error_answers_500_json_with_the_request_id() -> None:
    app = create_app(Service(Settings(jwt_secret=JWT_SECRET)))

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/boom", headers={"X-Request-ID": "r-500"})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error"}
    assert response.headers["X-Request-ID"] == "r-500"
    assert 'canvas_http_requests_total{method="GET",route="/boom",status="500"} 1.0' in metrics
