"""A job's whole lifecycle on the whole system as real processes: cancellation that
reaches the generator, priority when the generator is saturated, retries and their
backoff, permanent failures, Idempotency-Key under concurrent duplicates, and the job
list's pagination.

One system for the module, with one generator that runs one attempt at a time
(MAX_CONCURRENT_JOBS=1), so that a test can keep it busy with a "blocker": a job whose
model call never answers on its own ([[fake:timeout]], with a 120 s model timeout), and
that the test releases by cancelling it. Every test leaves the generator idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aio_pika
import httpx
import pytest

from canvas_events.topology import Topology
from tests.support.system import System
from tests.support.users import Socket, User
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

FINAL = ("completed", "failed", "cancelled")

# The module's system (tests/e2e/conftest.py).
SYSTEM_ENV = {
    "MAX_CONCURRENT_JOBS": "1",
    "MAX_JOB_RETRIES": "2",
    "RETRY_BACKOFF_UNIT_SECONDS": "0.2",
    # A blocker's call is held until it is cancelled, far beyond any deadline here; the
    # lease (180 s by default) must outlast it.
    "OPENAI_TIMEOUT_SECONDS": "120",
}


# -- helpers ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def client(system: System) -> AsyncIterator[tuple[User, Socket]]:
    """A new user, with a WebSocket open before any of their jobs exists."""
    async with User(system) as user, user.socket() as socket:
        yield user, socket


def stand_in_saw(system: System, marker: str) -> bool:
    """Whether any request the stand-in received mentions ``marker``."""
    return any(marker in json.dumps(body) for body in system.stand_in.requests())


async def work_queue_ready(system: System) -> int:
    """Messages waiting in the work queue (not those a generator holds)."""
    connection = await aio_pika.connect(system.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            Topology(system.prefix).generator_work.name, passive=True
        )
        return queue.declaration_result.message_count or 0


def generator_lines(system: System, job_id: str, event: str) -> list[dict[str, Any]]:
    return [
        line
        for line in system.processes["generator"].log_lines()
        if line.get("job_id") == job_id and line.get("event") == event
    ]


async def start_blocker(user: User) -> str:
    """A job whose model call holds the only generator slot until it is cancelled."""
    in_flight = user.system.stand_in.stats()["in_flight"]
    job_id, _ = await user.submit(f"blocker {uuid.uuid4().hex} [[fake:timeout]]")
    await user.until_status(job_id, "processing")
    await eventually(
        lambda: user.system.stand_in.stats()["in_flight"] == in_flight + 1,
        what="the blocker's model call in flight",
    )
    return job_id


async def release(user: User, blocker: str) -> None:
    """Cancel the blocker; its model call is aborted and the generator takes more work."""
    assert (await user.cancel(blocker)).status_code == 202
    await user.until_status(blocker, "cancelled")
    await eventually(
        lambda: generator_lines(user.system, blocker, "attempt cancelled"),
        what="the blocker's attempt cancelled",
    )


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- cancellation ----------------------------------------------------------------------


async def test_cancel_queued_job_never_calls_the_model(system: System) -> None:
    async with client(system) as (user, socket):
        blocker = await start_blocker(user)
        marker = uuid.uuid4().hex
        job_id, _ = await user.submit(f"a drawing nobody will see {marker}")
        await eventually(lambda: work_queue_ready(system), what="the attempt in the work queue")
        assert (await user.status(job_id))["status"] == "queued"

        assert (await user.cancel(job_id)).status_code == 202
        await user.until_status(job_id, "cancelled")
        await socket.until(job_id, "ai_job_cancelled")

        # The generator now takes the cancelled job's attempt from the queue: it must
        # drop it without a model call.
        await release(user, blocker)
        skipped = await eventually(
            lambda: generator_lines(system, job_id, "attempt skipped"),
            what="the cancelled job's attempt skipped",
        )
        assert skipped[0]["reason"] == "cancelled"
        assert await work_queue_ready(system) == 0
        assert not stand_in_saw(system, marker)
        types = [event["type"] for event in await user.events(job_id)]
        assert types == [
            "JobRequested",
            "JobQueued",
            "GenerationRequested",
            "JobCancelRequested",
            "JobCancelled",
        ]
        assert [f["type"] for f in socket.of(job_id)] == ["ai_job_queued", "ai_job_cancelled"]


async def test_cancel_while_processing_aborts_the_model_call_and_discards_objects(
    system: System,
) -> None:
    async with (
        client(system) as (user, socket),
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{system.ports['orchestrator']}",
            timeout=10,
            headers=system.service_headers(),
        ) as orchestrator,
    ):
        stats = system.stand_in.stats()
        marker = uuid.uuid4().hex
        job_id, canvas_id = await user.submit(f"a drawing cut short {marker} [[fake:timeout]]")
        await user.until_status(job_id, "processing")
        await socket.until(job_id, "ai_generation_started")
        await eventually(lambda: stand_in_saw(system, marker), what="the model call made")
        assert system.stand_in.stats()["in_flight"] == stats["in_flight"] + 1

        (requested,) = [e for e in await user.events(job_id) if e["type"] == "GenerationRequested"]
        attempt_url = f"/internal/attempts/{requested['data']['attempt_id']}"
        running = (await orchestrator.get(attempt_url, params={"job_id": job_id})).json()
        assert running == {
            "attempt_id": requested["data"]["attempt_id"],
            "job_id": job_id,
            "current": True,
            "status": "processing",
        }

        assert (await user.cancel(job_id)).status_code == 202
        await user.until_status(job_id, "cancelled")
        await socket.until(job_id, "ai_job_cancelled")

        # The call was aborted, not left to run out its 120 s timeout.
        await eventually(
            lambda: system.stand_in.stats()["in_flight"] == stats["in_flight"],
            what="the stand-in to see the call end",
        )
        assert system.stand_in.stats()["abandoned"] == stats["abandoned"] + 1
        await eventually(
            lambda: generator_lines(system, job_id, "attempt cancelled"),
            what="the generator to log the abort",
        )

        assert await user.objects(canvas_id) == []
        types = [event["type"] for event in await user.events(job_id)]
        assert "GenerationSucceeded" not in types and "GenerationFailed" not in types
        assert types[-1] == "JobCancelled"
        final = await user.status(job_id)
        assert final["result"] is None

        after = (await orchestrator.get(attempt_url, params={"job_id": job_id})).json()
        assert (after["current"], after["status"]) == (False, "cancelled")
        unknown = await orchestrator.get(f"/internal/attempts/{uuid.uuid4()}")
        assert unknown.status_code == 404


async def test_cancelling_a_final_job_answers_409(system: System) -> None:
    async with User(system) as user:
        done, _ = await user.submit("three boxes in a row")
        await user.until_status(done, "completed")
        refused = await user.cancel(done)
        assert refused.status_code == 409
        assert "completed" in refused.json()["detail"]
        assert (await user.status(done))["status"] == "completed"

        failed, _ = await user.submit("a bad request [[fake:status=400]]")
        await user.until_status(failed, "failed")
        assert (await user.cancel(failed)).status_code == 409


# -- priority --------------------------------------------------------------------------


async def test_higher_priority_job_starts_first_when_the_generator_is_busy(
    system: System,
) -> None:
    # Priority orders the jobs waiting for dispatch, in the orchestrator. What is already
    # handed out (at most the fleet's capacity + DISPATCH_HEADROOM: 1 + 5 here) waits in
    # the work queue, which on a quorum queue (RabbitMQ 3) starts it in the order handed
    # out. So the blocker and five fillers take all the room first; then three low
    # priority jobs and an urgent one wait for dispatch, and the urgent one goes first.
    async with client(system) as (user, socket):
        blocker = await start_blocker(user)
        fillers = [(await user.submit(f"filler {i}", priority=1)).job_id for i in range(5)]

        async def fillers_handed_out() -> bool:
            return await work_queue_ready(system) == len(fillers)

        await eventually(fillers_handed_out, what="the five fillers in the work queue")
        low = [(await user.submit(f"low priority {i}", priority=1)).job_id for i in range(3)]
        high, _ = await user.submit("urgent", priority=9)
        for job_id in [*low, high]:
            await user.until_status(job_id, "queued")
        await asyncio.sleep(0.5)  # five dispatch rounds
        for job_id in [*low, high]:
            types = [event["type"] for event in await user.events(job_id)]
            assert "GenerationRequested" not in types, f"{job_id} handed out with no room"
        assert await work_queue_ready(system) == len(fillers)

        await release(user, blocker)
        for job_id in [*fillers, *low, high]:
            await user.until_status(job_id, "completed")
            # The REST answer can be ahead of the frames (the relay publishes after).
            await socket.until(job_id, "ai_generation_started")
        started = sorted(
            (f for f in socket.frames if f["type"] == "ai_generation_started"),
            key=lambda f: f["position"],
        )
        order = [f["job_id"] for f in started if f["job_id"] in {*low, high}]
        assert order[0] == high, f"started in this order: {order} (high = {high})"
        assert sorted(order[1:]) == sorted(low)


# -- retries and permanent failures ----------------------------------------------------


async def test_server_errors_are_retried_up_to_max_job_retries_then_fail(system: System) -> None:
    async with client(system) as (user, socket):
        job_id, _ = await user.submit("always broken [[fake:status=500]]")
        final = await user.until_status(job_id, *FINAL)
        assert final["status"] == "failed"
        assert final["retry_count"] == 2
        assert "500" in final["error_message"]

        events = await user.events(job_id)
        retries = [e for e in events if e["type"] == "JobRetryScheduled"]
        assert [r["data"]["retry_count"] for r in retries] == [1, 2]
        for retry in retries:
            assert _at(retry["data"]["next_attempt_at"]) > _at(retry["occurred_at"])
        assert [e["type"] for e in events].count("GenerationFailed") == 3
        assert [e["data"]["attempt"] for e in events if e["type"] == "GenerationRequested"] == [
            1,
            2,
            3,
        ]

        def three_errors() -> list[dict[str, Any]] | None:
            errors = [f for f in socket.of(job_id) if f["type"] == "ai_job_error"]
            return errors if len(errors) == 3 else None

        errors = await eventually(three_errors, what="three ai_job_error frames")
        assert [(e["data"]["retryable"], e["data"]["final"]) for e in errors[:2]] == [
            (True, False),
            (True, False),
        ]
        assert all(e["data"]["next_attempt_at"] for e in errors[:2])
        assert errors[2]["data"]["final"] is True


async def test_rate_limit_retry_waits_at_least_the_retry_after(system: System) -> None:
    async with User(system) as user:
        job_id, _ = await user.submit("too fast [[fake:status=429,retry_after=1]]")
        final = await user.until_status(job_id, *FINAL)
        assert (final["status"], final["retry_count"]) == ("failed", 2)
        events = await user.events(job_id)
        retries = [e for e in events if e["type"] == "JobRetryScheduled"]
        assert len(retries) == 2
        # Each retry is decided on the 429 just before it: measured from the moment the
        # generator got that 429 (its GenerationFailed), the wait is at least the
        # Retry-After of 1 s, where the backoff alone would be 0.2 s, then 0.4 s.
        for retry in retries:
            index = events.index(retry)
            failed = events[index - 1]
            assert failed["type"] == "GenerationFailed"
            assert failed["data"]["retry_after_seconds"] == 1
            wait = _at(retry["data"]["next_attempt_at"]) - _at(failed["occurred_at"])
            assert wait.total_seconds() >= 1.0, wait
        # And no attempt was dispatched before its time.
        requested = [e for e in events if e["type"] == "GenerationRequested"]
        for retry, next_attempt in zip(retries, requested[1:], strict=True):
            assert _at(next_attempt["occurred_at"]) >= _at(retry["data"]["next_attempt_at"])


async def test_bad_request_fails_at_once_without_retries(system: System) -> None:
    async with User(system) as user:
        job_id, _ = await user.submit("refused [[fake:status=400]]")
        final = await user.until_status(job_id, *FINAL)
        assert (final["status"], final["retry_count"]) == ("failed", 0)
        assert "400" in final["error_message"]
        types = [e["type"] for e in await user.events(job_id)]
        assert "JobRetryScheduled" not in types
        assert types.count("GenerationRequested") == 1
        assert types[-1] == "JobFailed"


# -- Idempotency-Key and the job list --------------------------------------------------


async def test_concurrent_duplicate_requests_make_one_job(system: System) -> None:
    async with User(system) as user:
        key = f"key-{uuid.uuid4().hex}"
        answers = await asyncio.gather(
            *(user.post("one job only, please", key=key) for _ in range(10))
        )
        assert [a.status_code for a in answers] == [202] * 10, [a.text for a in answers]
        job_ids = {a.json()["job_id"] for a in answers}
        assert len(job_ids) == 1
        (job_id,) = job_ids
        await user.until_status(job_id, "completed")

        listed = (await user.http.get("/api/ai-agent/jobs")).json()
        assert [job["id"] for job in listed["jobs"]] == [job_id]
        types = [e["type"] for e in await user.events(job_id)]
        assert types.count("JobRequested") == 1
        assert types.count("GenerationRequested") == 1


async def test_job_list_pages_with_a_cursor_and_filters_by_status(system: System) -> None:
    async with User(system) as user:
        submitted = []
        for i in range(5):
            directive = " [[fake:status=400]]" if i % 2 else ""
            submitted.append((await user.submit(f"job number {i}{directive}")).job_id)
        for job_id in submitted:
            await user.until_status(job_id, *FINAL)
        newest_first = list(reversed(submitted))

        pages: list[list[str]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = (await user.http.get("/api/ai-agent/jobs", params=params)).json()
            if page["jobs"]:
                pages.append([job["id"] for job in page["jobs"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert len(pages) < 10, "the cursor never ends"
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [job_id for p in pages for job_id in p] == newest_first

        failed = (await user.http.get("/api/ai-agent/jobs", params={"status": "failed"})).json()
        assert [job["id"] for job in failed["jobs"]] == [submitted[3], submitted[1]]
        assert all(job["status"] == "failed" for job in failed["jobs"])
        completed = await user.http.get(
            "/api/ai-agent/jobs", params={"status": "completed", "limit": 2}
        )
        first = completed.json()
        assert [job["id"] for job in first["jobs"]] == [submitted[4], submitted[2]]
        rest = await user.http.get(
            "/api/ai-agent/jobs",
            params={"status": "completed", "limit": 2, "cursor": first["next_cursor"]},
        )
        assert [job["id"] for job in rest.json()["jobs"]] == [submitted[0]]
        assert rest.json()["next_cursor"] is None

        bad = await user.http.get("/api/ai-agent/jobs", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 422
