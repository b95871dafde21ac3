"""``canvas-jobs`` as a subprocess against the whole system running as real processes:
the exit codes and the lines a user and a script rely on."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from tests.cli.support import DEADLINE, cli_env, finish, run, start
from tests.support.system import JWT_SECRET, System

pytestmark = pytest.mark.e2e


def _user() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


async def _status(system: System, token: str, job_id: str) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=10) as http:
        answer = await http.get(
            f"/api/ai-agent/job/{job_id}/status", headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, object] = answer.json()
        return body


async def test_token_command_mints_a_token_the_gateway_accepts(system: System) -> None:
    minted = await run(
        "token", "--user", "cli-token-user", env=cli_env(None, None, JWT_SECRET=JWT_SECRET)
    )
    assert minted.code == 0, minted.stderr
    assert minted.stderr == ""  # JWT_SECRET set: no warning
    token = minted.stdout.strip()

    listed = await run("jobs", "--json", env=cli_env(system, token))
    assert listed.code == 0, listed.stderr
    assert json.loads(listed.stdout) == {"jobs": []}


async def test_submit_watch_exits_0_and_prints_completed_with_the_object_count(
    system: System,
) -> None:
    token = system.token(_user())
    result = await run(
        "submit", "a flowchart of a login flow", "--watch", env=cli_env(system, token)
    )
    assert result.code == 0, result.stdout + result.stderr
    job_id = result.lines[0]
    assert str(uuid.UUID(job_id)) == job_id

    status = await _status(system, token, job_id)
    assert status["status"] == "completed"
    result_data = status["result"]
    assert isinstance(result_data, dict)
    count = result_data["object_count"]
    assert result.lines[-1].startswith(f"completed: {count} object")
    assert any(line.startswith("queued") for line in result.lines)
    assert any(line.startswith("started") for line in result.lines)


async def test_submit_watch_of_a_failing_job_exits_1_with_its_error(system: System) -> None:
    token = system.token(_user())
    result = await run(
        "submit", "a diagram [[fake:status=401]]", "--watch", env=cli_env(system, token)
    )
    assert result.code == 1, result.stdout + result.stderr
    status = await _status(system, token, result.lines[0])
    assert status["status"] == "failed"
    assert status["error_message"]
    assert result.lines[-1] == f"failed: {status['error_message']}"


async def test_status_events_and_jobs_show_a_finished_job(system: System) -> None:
    token = system.token(_user())
    env = cli_env(system, token)
    submitted = [
        (await run("submit", f"a kanban board {n}", "--watch", env=env)).lines[0] for n in range(3)
    ]

    as_json = await run("status", submitted[0], "--json", env=env)
    assert as_json.code == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert body["id"] == submitted[0]
    assert body["status"] == "completed"
    as_table = await run("status", submitted[0], env=env)
    assert as_table.code == 0
    assert submitted[0] in as_table.stdout
    assert "completed" in as_table.stdout
    assert f"{body['result']['object_count']} object" in as_table.stdout

    events = await run("events", submitted[0], "--json", env=env)
    assert events.code == 0, events.stderr
    types = [event["type"] for event in json.loads(events.stdout)["events"]]
    assert types[0] == "JobRequested"
    assert types[-1] == "JobCompleted"
    events_table = await run("events", submitted[0], env=env)
    assert "JobRequested" in events_table.stdout
    assert "JobCompleted" in events_table.stdout

    # One job per request: --all follows next_cursor through every page.
    every = await run("jobs", "--all", "--page-size", "1", "--json", env=env)
    assert every.code == 0, every.stderr
    assert [job["id"] for job in json.loads(every.stdout)["jobs"]] == submitted[::-1]
    two = await run("jobs", "--limit", "2", "--page-size", "1", "--json", env=env)
    assert [job["id"] for job in json.loads(two.stdout)["jobs"]] == submitted[:0:-1]
    none = await run("jobs", "--status", "failed", "--json", env=env)
    assert json.loads(none.stdout) == {"jobs": []}
    table = await run("jobs", env=env)
    assert table.code == 0
    assert all(job_id in table.stdout for job_id in submitted)

    # The objects the first job drew, on its canvas.
    canvas = str(body["canvas_id"])
    drawn = await run("objects", canvas, "--json", env=env)
    assert drawn.code == 0, drawn.stderr
    objects = json.loads(drawn.stdout)["objects"]
    assert [item["job_id"] for item in objects] == [submitted[0]] * len(objects)
    assert len(objects) == body["result"]["object_count"]
    drawn_table = await run("objects", canvas, env=env)
    assert drawn_table.code == 0
    assert objects[0]["type"] in drawn_table.stdout
    assert submitted[0][:8] in drawn_table.stdout


async def test_watch_of_a_finished_job_prints_its_outcome_at_once(system: System) -> None:
    token = system.token(_user())
    env = cli_env(system, token)
    job_id = (await run("submit", "a mind map", "--watch", env=env)).lines[0]

    again = await run("watch", job_id, env=env)
    assert again.code == 0, again.stderr
    assert again.lines[-1].startswith("completed: ")
    frames = await run("watch", job_id, "--json", env=env)
    assert frames.code == 0
    kinds = [json.loads(line)["type"] for line in frames.lines]
    assert kinds[0] == "ai_job_queued"
    assert kinds[-1] == "ai_generation_completed"


async def test_watch_exits_2_when_the_job_is_cancelled(system: System) -> None:
    token = system.token(_user())
    env = cli_env(system, token)
    submitted = await run("submit", "a slow drawing [[fake:delay_ms=30000]]", env=env)
    assert submitted.code == 0, submitted.stderr
    job_id = submitted.lines[0]

    watching = await start("watch", job_id, env=env)
    assert watching.stdout is not None
    # Cancel only once the watch is live and the model call runs.
    async with asyncio.timeout(DEADLINE):
        while True:
            line = await watching.stdout.readline()
            assert line, "watch ended before the job started"
            if line.startswith(b"started"):
                break
    cancelled = await run("cancel", job_id, env=env)
    assert cancelled.code == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"cancelling {job_id}"

    watched = await finish(watching)
    assert watched.code == 2, watched.stdout + watched.stderr
    assert watched.lines[-1].startswith("cancelled")

    twice = await run("cancel", job_id, env=env)
    assert twice.code == 3
    assert "409" in twice.stderr
    assert "already cancelled" in twice.stderr


async def test_a_bad_token_is_a_clear_error_and_never_printed(system: System) -> None:
    forged = "forged." + uuid.uuid4().hex + ".token"
    env = cli_env(system, forged)
    for args in (("status", str(uuid.uuid4())), ("submit", "a drawing", "--watch"), ("jobs",)):
        result = await run(*args, env=env)
        assert result.code == 3, result.stdout + result.stderr
        assert "401" in result.stderr
        assert "invalid token" in result.stderr
        assert "CANVAS_TOKEN" in result.stderr  # the hint says where the token comes from
        assert forged not in result.stdout + result.stderr

    wrong_secret = await run(
        "token", "--user", "mallory", env=cli_env(None, None, JWT_SECRET="x" * 40)
    )
    rejected = await run("jobs", env=cli_env(system, wrong_secret.stdout.strip()))
    assert rejected.code == 3
    assert "401" in rejected.stderr

    missing = await run("jobs", env=cli_env(system, None))
    assert missing.code == 3
    assert "no token" in missing.stderr


async def test_unknown_job_and_rejected_request_are_clear_errors(system: System) -> None:
    env = cli_env(system, system.token(_user()))
    unknown = str(uuid.uuid4())
    for command in ("status", "events", "cancel", "watch"):
        result = await run(command, unknown, env=env)
        assert result.code == 3, (command, result.stdout, result.stderr)
        assert "404: job not found" in result.stderr

    # Someone else's job reads exactly like one that does not exist.
    other = cli_env(system, system.token(_user()))
    theirs = (await run("submit", "a private drawing", env=other)).lines[0]
    assert "404: job not found" in (await run("status", theirs, env=env)).stderr

    bad_canvas = await run("submit", "a drawing", "--canvas", "no spaces allowed", env=env)
    assert bad_canvas.code == 3
    assert "422" in bad_canvas.stderr
    assert "canvas_id" in bad_canvas.stderr


async def test_submit_with_the_same_idempotency_key_gives_the_same_job(system: System) -> None:
    env = cli_env(system, system.token(_user()))
    key = uuid.uuid4().hex
    first = await run("submit", "a logo", "--idempotency-key", key, "--json", env=env)
    second = await run("submit", "a logo", "--idempotency-key", key, "--json", env=env)
    assert first.code == second.code == 0
    assert json.loads(first.stdout)["job_id"] == json.loads(second.stdout)["job_id"]


async def test_retry_runs_a_failed_job_again_and_watches_it(system: System) -> None:
    user = _user()
    env = cli_env(system, system.token(user))
    prompt = f"a {uuid.uuid4().hex[:6]} org chart [[fake:status=400,first=1]]"
    failed = await run("submit", prompt, "--watch", env=env)
    assert failed.code == 1, failed.stdout + failed.stderr
    failed_id = failed.lines[0]

    retried = await run("retry", failed_id, "--watch", env=env)
    assert retried.code == 0, retried.stdout + retried.stderr
    new_id = retried.lines[0]
    assert new_id != failed_id
    assert retried.lines[-1].startswith("completed: ")
    status = await run("status", new_id, env=env)
    assert f"runs again  {failed_id}" in " ".join(status.stdout.split("\n"))
    assert "org chart" in status.stdout

    again = await run("retry", new_id, "--json", env=env)  # completed: final, may run again
    assert again.code == 0, again.stderr
    assert json.loads(again.stdout)["retry_of"] == new_id
    running = await run("retry", json.loads(again.stdout)["job_id"], env=env)
    if running.code != 0:  # unless it already ended
        assert running.code == 3 and "409" in running.stderr, running.stderr


async def test_jobs_all_users_is_for_admins_and_filters(system: System) -> None:
    alice, bob = _user(), _user()
    word = uuid.uuid4().hex[:8]
    await run("submit", f"alice's {word} board", env=cli_env(system, system.token(alice)))
    await run("submit", f"bob's {word} board", env=cli_env(system, system.token(bob)))
    await run("submit", "bob's other board", env=cli_env(system, system.token(bob)))

    refused = await run("jobs", "--all-users", env=cli_env(system, system.token(alice)))
    assert refused.code == 3
    assert "403" in refused.stderr and "--admin" in refused.stderr

    admin = cli_env(system, system.token("cli-admin", admin=True))
    found = await run("jobs", "--all-users", "--search", word.upper(), "--json", env=admin)
    assert found.code == 0, found.stderr
    jobs = json.loads(found.stdout)["jobs"]
    assert sorted(job["user_id"] for job in jobs) == sorted([alice, bob])
    bobs = await run("jobs", "--all-users", "--user", bob, "--since", "2000-01-01", env=admin)
    assert bobs.code == 0, bobs.stderr
    assert "bob's other board" in bobs.stdout and bob in bobs.stdout
    assert alice not in bobs.stdout
    mixed = await run("jobs", "--search", word, env=admin)
    assert mixed.code == 3 and "--all-users" in mixed.stderr
