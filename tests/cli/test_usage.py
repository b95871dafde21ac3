"""``canvas-jobs usage`` and the daily token budget, as a subprocess against the whole
system running as real processes with USER_DAILY_TOKEN_BUDGET set: the tokens a
completed job used are counted, the next submit is refused with the reset time, and an
admin's is not."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.cli.support import cli_env, run
from tests.support.system import System, running_system

pytestmark = pytest.mark.e2e

# One job of the stand-in model uses hundreds of tokens: after one, a user is past it.
BUDGET = 100


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(
        tmp_path_factory.mktemp("cli-usage-logs"),
        label="cliusage",
        extra_env={"USER_DAILY_TOKEN_BUDGET": str(BUDGET)},
    ) as running:
        yield running


def _user() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def _next_midnight() -> str:
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    return f"{tomorrow.isoformat()}T00:00:00Z"


async def _job_tokens(system: System, token: str, job_id: str) -> int:
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=10) as http:
        answer = await http.get(
            f"/api/ai-agent/job/{job_id}/status", headers={"Authorization": f"Bearer {token}"}
        )
    assert answer.status_code == 200, answer.text
    tokens: int = answer.json()["result"]["usage"]["total_tokens"]
    return tokens


async def test_usage_counts_a_completed_job_and_the_next_submit_is_refused(
    system: System,
) -> None:
    token = system.token(_user())
    env = cli_env(system, token)
    fresh = await run("usage", "--json", env=env)
    assert fresh.code == 0, fresh.stderr
    assert json.loads(fresh.stdout) == {
        "tokens_used_today": 0,
        "daily_budget": BUDGET,
        "resets_at": _next_midnight(),
    }

    done = await run("submit", "a flowchart of a login flow", "--watch", env=env)
    assert done.code == 0, done.stdout + done.stderr
    used = await _job_tokens(system, token, done.lines[0])
    assert used > BUDGET

    spent = await run("usage", "--json", env=env)
    assert json.loads(spent.stdout)["tokens_used_today"] == used
    table = await run("usage", env=env)
    assert table.code == 0, table.stderr
    assert f"tokens today  {used:,}" in table.stdout
    assert f"daily budget  {BUDGET}" in table.stdout
    assert "left          0" in table.stdout

    refused = await run("submit", "one more drawing", env=env)
    assert refused.code == 3
    assert (
        f"429: daily token budget used ({used:,} of {BUDGET} tokens); "
        f"it resets at {_next_midnight()}"
    ) in refused.stderr
    assert "canvas-jobs usage" in refused.stderr
    assert refused.stdout == ""


async def test_an_admin_past_the_budget_still_submits_and_has_no_budget(system: System) -> None:
    env = cli_env(system, system.token(_user(), admin=True))
    first = await run("submit", "a mind map", "--watch", env=env)
    assert first.code == 0, first.stdout + first.stderr

    usage = json.loads((await run("usage", "--json", env=env)).stdout)
    second = await run("submit", "another mind map", "--watch", env=env)

    assert usage["tokens_used_today"] > BUDGET
    assert usage["daily_budget"] is None
    assert second.code == 0, second.stdout + second.stderr
    table = await run("usage", env=env)
    assert "daily budget  none" in table.stdout
