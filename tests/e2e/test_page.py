"""The live canvas page at the gateway's ``/``, driven in headless Chromium (Debian's
``chromium``, through Playwright) against the whole system as real processes: sign in,
submit a prompt, watch the objects land on the SVG canvas; survive a notifier restart
by reconnecting with ``after``.

Screenshots go under each test's tmp_path; with SAVE_DOCS_SCREENSHOT=1 the first test
also writes docs/canvas.png, the README's picture, and the admin's docs/admin.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, WebSocketRoute, async_playwright
from pydantic import ValidationError
from starlette.requests import Request

from canvas_gateway.api import create_app
from canvas_gateway.routes.page import notifier_url
from canvas_gateway.service import Service
from canvas_gateway.settings import Settings
from tests.support.system import JWT_SECRET, System
from tests.support.users import User

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "canvas.png"
DOCS_ADMIN_SCREENSHOT = DOCS_SCREENSHOT.with_name("admin.png")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--headless",
]
# Milliseconds Playwright waits for any one thing on the page: a job takes about a
# second here; the notifier restart a few.
WAIT_MS = 30_000
DEADLINE_SECONDS = 30.0
# What each object type is drawn as: (SVG element, whether it carries an arrowhead).
DRAWN_AS = {
    "rectangle": ("rect", False),
    "sticky_note": ("rect", False),
    "circle": ("circle", False),
    "text": ("text", False),
    "line": ("polyline", False),
    "arrow": ("polyline", True),
}


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed: these tests drive Debian's chromium package; "
            "run `make browser` as root (apt-get install chromium)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    # A context of its own per test: an empty localStorage, so no token or canvas leaks.
    context = await browser.new_context(viewport={"width": 1400, "height": 860})
    context.set_default_timeout(WAIT_MS)
    opened = await context.new_page()
    # Uncaught script errors and anything the Content-Security-Policy blocked fail the
    # test (failed requests do not: a new canvas answers 404, a stopped notifier refuses).
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    opened.on(
        "console",
        lambda message: (
            problems.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    try:
        yield opened
    finally:
        await context.close()
    assert not problems, problems


@pytest.fixture
async def user(system: System) -> AsyncIterator[User]:
    """A new user of the system, for the page and for the API."""
    async with User(system) as new:
        yield new


async def _sign_in(page: Page, system: System, token: str) -> None:
    await page.goto(f"{system.gateway_url}/")
    await page.fill("#token", token)
    await page.click("#sign-in-form button[type=submit]")
    await page.wait_for_selector('#connection[data-state="live"]')


async def _submit(page: Page, query: str) -> str:
    """Type ``query``, submit it, and return the job id the page shows."""
    known = await page.eval_on_selector_all(
        "#jobs li[data-job-id]", "items => items.map(i => i.dataset.jobId)"
    )
    await page.fill("#query", query)
    await page.click("#submit")
    handle = await page.wait_for_function(
        """known => {
            const current = document.querySelector("#current-job dl[data-job-id]");
            return current && !known.includes(current.dataset.jobId) && current.dataset.jobId;
        }""",
        arg=known,
    )
    return str(await handle.json_value())


async def _final_status(user: User, job_id: str) -> dict[str, Any]:
    """The job's status once it is final, polled from the API."""
    final = ("completed", "failed", "cancelled")
    return await user.until_status(job_id, *final, timeout=DEADLINE_SECONDS)


async def _wait_drawn(page: Page, job_id: str, count: int) -> None:
    """Until the board holds exactly ``count`` objects of the job, all final (on the
    canvas for good, none provisional left)."""
    await page.wait_for_function(
        """([jobId, count]) => {
            const drawn = document.querySelectorAll(`#objects g.obj[data-job-id="${jobId}"]`);
            return drawn.length === count
                && Array.from(drawn).every(g => g.dataset.state === "final");
        }""",
        arg=[job_id, count],
    )


async def _drawn(page: Page, job_id: str) -> list[dict[str, Any]]:
    """Each drawn object of the job: its type, id, child elements and arrowhead."""
    result: list[dict[str, Any]] = await page.eval_on_selector_all(
        f'#objects g.obj[data-job-id="{job_id}"]',
        """groups => groups.map(g => ({
            type: g.dataset.type,
            id: g.dataset.objectId,
            tags: Array.from(g.children).map(c => c.tagName),
            arrow: Array.from(g.children).some(c => c.hasAttribute("marker-end")),
        }))""",
    )
    return result


@pytest.mark.e2e
async def test_prompt_is_drawn_on_the_page_and_listed_completed(
    system: System, user: User, page: Page, tmp_path: Path
) -> None:
    await _sign_in(page, system, user.token)

    # The stand-in draws 10 objects for this prompt, sticky notes among them.
    job_id = await _submit(
        page, "a flowchart of a login flow: email, password, two-factor code, dashboard"
    )
    status = await _final_status(user, job_id)
    assert status["status"] == "completed", status
    count = status["result"]["object_count"]
    assert count >= 3
    await _wait_drawn(page, job_id, count)

    objects = {o["id"]: o for o in await user.objects(status["canvas_id"])}
    drawn = await _drawn(page, job_id)
    assert {d["id"] for d in drawn} == set(objects) == set(status["result"]["object_ids"])
    for item in drawn:
        kind = objects[item["id"]]["type"]
        element, arrow = DRAWN_AS[kind]
        assert item["type"] == kind
        assert element in item["tags"], item
        assert item["arrow"] is arrow, item

    listed = page.locator(f'#jobs li[data-job-id="{job_id}"]')
    await listed.locator('.status[data-status="completed"]').wait_for()
    assert "completed" in await listed.inner_text()
    assert await page.locator("#canvas-label").inner_text() == status["canvas_id"]

    # "disabled" finishes the objects' fade-in, so the picture shows them as they stay.
    await page.screenshot(path=tmp_path / "canvas.png", animations="disabled")
    if os.environ.get("SAVE_DOCS_SCREENSHOT") == "1":
        await page.screenshot(path=DOCS_SCREENSHOT, animations="disabled")

    # A new visit shows the canvas's earlier objects from the start.
    await page.reload()
    await page.wait_for_selector('#connection[data-state="live"]')
    await _wait_drawn(page, job_id, count)


@pytest.mark.e2e
async def test_page_reconnects_with_after_when_the_notifier_restarts(
    system: System, user: User, page: Page, tmp_path: Path
) -> None:
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await _sign_in(page, system, user.token)

    first = await _submit(page, "a kanban board with three columns")
    first_status = await _final_status(user, first)
    await _wait_drawn(page, first, first_status["result"]["object_count"])
    # Waits for the completed frame itself: the objects may come from an earlier reload.
    await page.wait_for_function(
        "() => document.querySelector('#connection').dataset.position !== undefined"
    )
    await page.locator(f'#jobs li[data-job-id="{first}"][data-status="completed"]').wait_for()
    position = int(await page.get_attribute("#connection", "data-position") or "0")

    notifier = system.processes["notifier"]
    await asyncio.to_thread(notifier.stop)
    await page.wait_for_selector('#connection[data-state="offline"]')

    # Submitted and finished while no notifier runs: only a replay can bring its frames.
    second = await _submit(page, "a mind map about the sea")
    second_status = await _final_status(user, second)
    assert second_status["status"] == "completed", second_status
    assert await page.locator(f'#objects g.obj[data-job-id="{second}"]').count() == 0

    notifier.start()
    await notifier.wait_ready()
    await page.wait_for_selector('#connection[data-state="live"]')
    assert any(f"after={position}" in url for url in sockets[1:]), sockets
    await _wait_drawn(page, second, second_status["result"]["object_count"])
    await page.locator(f'#jobs li[data-job-id="{second}"][data-status="completed"]').wait_for()
    # The first job's objects are still there, once each.
    await _wait_drawn(page, first, first_status["result"]["object_count"])
    await page.screenshot(path=tmp_path / "reconnected.png", animations="disabled")


@pytest.mark.e2e
async def test_cancel_button_cancels_a_running_job(system: System, user: User, page: Page) -> None:
    await _sign_in(page, system, user.token)
    # The stand-in holds its answer for 20 s: the job is still running when cancelled.
    job_id = await _submit(page, "a slow drawing [[fake:delay_ms=20000]]")
    await page.click('#current-job button[data-action="cancel"]')

    status = await _final_status(user, job_id)
    assert status["status"] == "cancelled", status
    listed = page.locator(f'#jobs li[data-job-id="{job_id}"]')
    await listed.locator('.status[data-status="cancelled"]').wait_for()
    assert await listed.locator('button[data-action="cancel"]').count() == 0
    assert await page.locator(f'#objects g.obj[data-job-id="{job_id}"]').count() == 0


@pytest.mark.e2e
async def test_progress_frames_draw_one_by_one_and_a_failed_job_leaves_nothing(
    system: System, page: Page
) -> None:
    # The notifier's side is played here: frames exactly as docs/api.md describes
    # them, including ai_generation_progress, which the generator may not stream yet.
    token = system.token(f"page-{uuid.uuid4().hex[:8]}")
    routes: list[WebSocketRoute] = []
    page_ready = asyncio.Event()

    def accept(ws: WebSocketRoute) -> None:
        routes.append(ws)
        page_ready.set()

    await page.route_web_socket(f"ws://127.0.0.1:{system.ports['notifier']}/**", accept)
    await page.goto(f"{system.gateway_url}/")
    await page.fill("#token", token)
    await page.click("#sign-in-form button[type=submit]")
    await asyncio.wait_for(page_ready.wait(), DEADLINE_SECONDS)
    await page.wait_for_selector('#connection[data-state="live"]')
    canvas_id = await page.input_value("#canvas-id") or "mock-canvas"
    await page.fill("#canvas-id", canvas_id)
    await page.dispatch_event("#canvas-id", "change")
    job_id = str(uuid.uuid4())
    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    objects = [
        {"type": "rectangle", "x": 40, "y": 40, "width": 200, "height": 80, "text": hostile},
        {"type": "circle", "x": 400, "y": 80, "radius": 40, "fill": "#ffd966"},
        {"type": "arrow", "points": [[240, 80], [360, 80]], "stroke": "#ff0000"},
    ]
    position = 100

    def send(kind: str, data: dict[str, Any]) -> None:
        nonlocal position
        position += 1
        frame = {
            "type": kind,
            "job_id": job_id,
            "canvas_id": canvas_id,
            "position": position,
            "occurred_at": "2025-01-01T12:00:00Z",
            "data": data,
        }
        routes[-1].send(json.dumps(frame))

    attempt = str(uuid.uuid4())
    send("ai_job_queued", {"priority": 5, "retry_count": 0})
    send("ai_generation_started", {"model": "fake", "attempt_id": attempt})
    selector = f'#objects g.obj[data-job-id="{job_id}"]'
    for index, obj in enumerate(objects):
        send("ai_generation_progress", {"index": index, "object": obj, "attempt_id": attempt})
        await page.wait_for_function(
            "([s, n]) => document.querySelectorAll(s).length === n", arg=[selector, index + 1]
        )
    drawn = await _drawn(page, job_id)
    assert [d["type"] for d in drawn] == ["rectangle", "circle", "arrow"]
    # The model's text is text, not markup.
    lines = await page.eval_on_selector_all(
        f'{selector}[data-type="rectangle"] text tspan', "spans => spans.map(s => s.textContent)"
    )
    assert " ".join(lines) == hostile  # wrapped into lines at its spaces
    assert await page.locator("#objects img").count() == 0
    assert await page.title() != "pwned"

    send(
        "ai_job_error",
        {"retryable": False, "final": True, "next_attempt_at": None, "error": "model said no"},
    )
    await page.wait_for_function("s => document.querySelectorAll(s).length === 0", arg=selector)
    listed = page.locator(f'#jobs li[data-job-id="{job_id}"]')
    await listed.locator('.status[data-status="failed"]').wait_for()
    assert "model said no" in await listed.inner_text()


@pytest.mark.e2e
async def test_an_admin_finds_another_users_failed_job_reads_its_timeline_and_retries_it(
    system: System, user: User, page: Page, tmp_path: Path
) -> None:
    # The user's job fails for good (the model refuses it once); run again, it works.
    word = f"ledger-{uuid.uuid4().hex[:6]}"
    failed = await user.submit(f"a quarterly {word} dashboard [[fake:status=400,first=1]]")
    assert (await _final_status(user, failed.job_id))["status"] == "failed"
    async with User(system) as other:
        await other.submit("a kanban board with three columns")  # another user's noise

    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    await _sign_in(page, system, system.token(f"ops-{uuid.uuid4().hex[:6]}", admin=True))
    await page.click('#tabs button[data-tab="admin"]')
    await page.fill("#admin-q", word.upper())  # case-insensitive
    await page.click("#admin-filters button[type=submit]")
    # Until the filtered answer is shown (the tab's first, unfiltered one may come first):
    # that one row, the other user's job not among the rows.
    await page.wait_for_function(
        """jobId => {
            const rows = document.querySelectorAll("#admin-jobs tr[data-job-id]");
            return rows.length === 1 && rows[0].dataset.jobId === jobId;
        }""",
        arg=failed.job_id,
    )
    row = page.locator(f'#admin-jobs tr[data-job-id="{failed.job_id}"][data-status="failed"]')
    await row.wait_for()
    assert await row.locator("td.user").inner_text() == user.name
    assert "400" in await row.locator("td.job-error").inner_text()

    await row.locator("td.query").click()
    timeline = page.locator(f'#admin-timeline[data-job-id="{failed.job_id}"]')
    await timeline.locator('li[data-type="JobFailed"]').wait_for()
    types = await timeline.locator("li .type").all_inner_texts()
    assert types[0] == "JobRequested" and types[-1] == "JobFailed", types
    assert "GenerationFailed" in types
    assert (
        "permanent bad_request"
        in await timeline.locator('li[data-type="GenerationFailed"]').inner_text()
    )
    await page.screenshot(path=tmp_path / "admin-failed.png")

    await row.locator('button[data-action="retry"]').click()
    # The new job is listed (it matches the same text), selected, and completes.
    retried = page.locator(
        f'#admin-jobs tr.selected[data-status="completed"]:not([data-job-id="{failed.job_id}"])'
    )
    await retried.wait_for()
    new_id = str(await retried.get_attribute("data-job-id"))
    status = await user.status(new_id)  # the owner's job, not the admin's
    assert (status["status"], status["retry_of"]) == ("completed", failed.job_id)
    completed = page.locator(
        f'#admin-timeline[data-job-id="{new_id}"] li[data-type="JobCompleted"]'
    )
    await completed.wait_for()
    assert "tokens" in await completed.inner_text()
    assert (
        f"runs job {failed.job_id[:8]} again"
        in await page.locator(
            f'#admin-timeline[data-job-id="{new_id}"] li[data-type="JobRequested"]'
        ).inner_text()
    )
    await page.screenshot(path=tmp_path / "admin-retried.png")
    if os.environ.get("SAVE_DOCS_SCREENSHOT") == "1":
        await page.screenshot(path=DOCS_ADMIN_SCREENSHOT)
    assert any("/api/admin/jobs?" in url for url in requests)


@pytest.mark.e2e
async def test_a_user_retries_a_failed_job_and_a_new_canvas_is_never_asked_for(
    system: System, user: User, page: Page
) -> None:
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    await _sign_in(page, system, user.token)
    job_id = await _submit(page, f"a {uuid.uuid4().hex[:6]} tree [[fake:status=400,first=1]]")
    listed = page.locator(f'#jobs li[data-job-id="{job_id}"]')
    await listed.locator('.status[data-status="failed"]').wait_for()
    # The list shows the prompt from the API, not a job id.
    assert "tree" in await listed.locator(".query").inner_text()
    canvas_id = await page.input_value("#canvas-id")
    # Nothing ever completed on the canvas the page named: it never asked for its objects.
    assert not [url for url in asked if "/objects" in url], asked

    await listed.locator('button[data-action="retry"]').click()
    current = page.locator("#current-job dl[data-job-id]")
    await page.wait_for_function(
        "old => { const c = document.querySelector('#current-job dl[data-job-id]');"
        " return c && c.dataset.jobId !== old; }",
        arg=job_id,
    )
    new_id = str(await current.get_attribute("data-job-id"))
    status = await _final_status(user, new_id)
    assert (status["status"], status["retry_of"], status["canvas_id"]) == (
        "completed",
        job_id,
        canvas_id,
    )
    await _wait_drawn(page, new_id, status["result"]["object_count"])
    await current.locator("dt", has_text="runs again").wait_for()

    # Another canvas: the current job is not the old canvas's any more.
    await page.click("#new-canvas")
    await page.locator("#current-job p.muted").wait_for()
    assert await page.locator("#canvas-info").inner_text() == "new canvas: nothing drawn yet"


# -- where the page finds the notifier (in process: these need no database or broker) --


async def _config(settings: Settings, base_url: str) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=create_app(Service(settings)))
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
        answer = await http.get("/config.json")
        page = await http.get("/")
    assert answer.status_code == 200 and page.status_code == 200
    body: dict[str, Any] = answer.json()
    # The page may connect only to what config.json names (and its own origin).
    origin = body["notifier_url"].rsplit("/", 1)[0]
    assert f"connect-src 'self' {origin}" in page.headers["content-security-policy"]
    return body


async def test_config_points_at_the_notifier_on_the_host_the_browser_used() -> None:
    settings = Settings(notifier_port=9001, jwt_secret=JWT_SECRET)
    assert await _config(settings, "http://canvas.example:8000") == {
        "notifier_url": "ws://canvas.example:9001/ws"
    }
    assert await _config(settings, "https://canvas.example") == {
        "notifier_url": "wss://canvas.example:9001/ws"
    }
    assert await _config(settings, "http://[::1]:8000") == {"notifier_url": "ws://[::1]:9001/ws"}
    # Whatever names the host (Starlette checks the Host header, else takes the server's
    # address), something that is no host name never reaches the URL or the CSP header.
    scope = {
        "type": "http",
        "scheme": "http",
        "server": ("evil.example'; script-src *", 80),
        "path": "/config.json",
        "query_string": b"",
        "headers": [],
    }
    assert notifier_url(settings, Request(scope)) == "ws://localhost:9001/ws"


async def test_config_gives_notifier_public_url_when_set() -> None:
    settings = Settings(notifier_public_url="wss://live.canvas.example/ws", jwt_secret=JWT_SECRET)
    assert await _config(settings, "http://gateway.internal:8000") == {
        "notifier_url": "wss://live.canvas.example/ws"
    }
    assert Settings(notifier_public_url="", jwt_secret=JWT_SECRET).notifier_public_url is None
    with pytest.raises(ValidationError, match="ws:// or wss://"):
        Settings(notifier_public_url="https://live.canvas.example/ws", jwt_secret=JWT_SECRET)


async def test_only_the_pages_own_files_are_served() -> None:
    transport = httpx.ASGITransport(app=create_app(Service(Settings(jwt_secret=JWT_SECRET))))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        for name in ("app.js", "admin.js"):
            script = await http.get(f"/static/{name}")
            assert script.status_code == 200
            assert script.headers["content-type"].startswith("text/javascript")
        for path in ("/static/index.html", "/static/..%2Fapp.py", "/static/nothing.js"):
            assert (await http.get(path)).status_code == 404, path
