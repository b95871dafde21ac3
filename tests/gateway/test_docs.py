"""/docs and /redoc work offline: the pages name only the gateway's own URLs, each of
which answers, and Swagger UI renders the API in a browser that may reach nothing else."""

from __future__ import annotations

import re
import shutil
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Request, Route, async_playwright

from canvas_gateway.api import DOCS_ASSETS, create_app
from canvas_gateway.service import Service
from canvas_gateway.settings import Settings
from tests.gateway.conftest import JWT_SECRET, Gateway

# src="...", href="...", url: '...', spec-url="..."
_URL = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--headless"]


def urls_in(html: str) -> list[str]:
    return [a or b for a, b in _URL.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_pages_name_only_local_urls_and_each_answers(page: str) -> None:
    app = create_app(Service(Settings(jwt_secret=JWT_SECRET)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        answer = await client.get(page)
        assert answer.status_code == 200
        urls = urls_in(answer.text)
        assert urls, answer.text  # the pattern still finds the page's assets
        assert all(url.startswith("/") and not url.startswith("//") for url in urls), urls
        assert any(url.startswith(f"{DOCS_ASSETS}/") and url.endswith(".js") for url in urls)
        for url in urls:
            asset = await client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 100, url


async def test_swagger_ui_renders_the_api_with_no_network_but_the_gateway(
    gateway: Gateway,
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is missing: run `make browser` as root", pytrace=False)
    local = urlsplit(str(gateway.client.base_url)).netloc
    elsewhere: list[str] = []

    async def only_the_gateway(route: Route, request: Request) -> None:
        if urlsplit(request.url).netloc == local:
            await route.continue_()
        else:  # what a machine without internet access does
            elsewhere.append(request.url)
            await route.abort()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.route("**/*", only_the_gateway)
            await page.goto(f"http://{local}/docs")
            # One block per operation, drawn from /openapi.json by Swagger UI's script.
            operations = page.locator(".opblock-summary-path")
            await operations.first.wait_for(timeout=20_000)
            paths = set(await operations.all_inner_texts())
        finally:
            await browser.close()
    assert "/api/ai-agent/create-canvas" in {p.replace("\u200b", "") for p in paths}
    assert elsewhere == []
