"""The canvas page and the daily token budget, in headless Chromium against the whole
system with USER_DAILY_TOKEN_BUDGET set: the side panel shows the tokens of the day
against the budget, updated when a job completes, and a submission past the budget
shows the 429's detail under the form."""

from __future__ import annotations

import pytest
from playwright.async_api import Page

from tests.e2e.test_page import _final_status, _sign_in, _submit, browser, page, user  # noqa: F401 (fixtures)
from tests.support.system import System
from tests.support.users import User

# One job of the stand-in model uses hundreds of tokens: after one, a user is past it.
BUDGET = 100
SYSTEM_ENV = {"USER_DAILY_TOKEN_BUDGET": str(BUDGET)}


@pytest.mark.e2e
async def test_the_page_shows_tokens_today_and_the_budgets_429(
    system: System,
    user: User,  # noqa: F811
    page: Page,  # noqa: F811
) -> None:
    await _sign_in(page, system, user.token)
    usage = page.locator("#usage")
    await page.wait_for_function(
        "() => document.querySelector('#usage').textContent === 'tokens today: 0 of 100'"
    )

    job_id = await _submit(page, "a flowchart of a login flow")
    status = await _final_status(user, job_id)
    assert status["status"] == "completed", status
    used = status["result"]["usage"]["total_tokens"]
    assert used > BUDGET
    expected = f"tokens today: {used:,} of {BUDGET}"
    await page.wait_for_function(
        "text => document.querySelector('#usage').textContent === text", arg=expected
    )
    assert await usage.get_attribute("data-over") == "true"

    await page.fill("#query", "one more drawing")
    await page.click("#submit")
    error = page.locator("#form-error")
    await page.wait_for_function("() => document.querySelector('#form-error').textContent")
    text = await error.inner_text()
    assert text.startswith(f"daily token budget used ({used:,} of {BUDGET} tokens); it resets at")
    assert "try again in" not in text  # the detail says when, not a count of seconds
