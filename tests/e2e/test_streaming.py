"""Streamed objects on the whole system as real processes: each object the model writes
reaches the client over the WebSocket as an ``ai_generation_progress`` frame before the
job completes, in index order, and the canvas then holds exactly those objects; a
stream cut off midway is retried; a client that reconnects with ``after`` gets the
progress it missed; a job cancelled midway leaves nothing on the canvas.

The stand-in streams every reply in small pieces, 20 ms apart. A reply with
``[[fake:gate=NAME]]`` pauses halfway until the test opens the gate, so a test can tell,
without timing anything, that objects arrived while the model was still writing.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest

from tests.support.system import System
from tests.support.users import User
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

PROGRESS = "ai_generation_progress"
COMPLETED = "ai_generation_completed"

# The module's system (tests/e2e/conftest.py).
SYSTEM_ENV = {
    # Slow enough that a reply takes a second or two, object after object.
    "FAKE_OPENAI_CHUNK_DELAY_MS": "20",
    "MAX_JOB_RETRIES": "1",
    "RETRY_BACKOFF_UNIT_SECONDS": "0.2",
    # A gated reply waits for the test; the call's deadline must outlast that.
    "OPENAI_TIMEOUT_SECONDS": "60",
}


# -- helpers ---------------------------------------------------------------------------


def drawn(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Canvas objects as the model drew them: without the canvas's id and job_id."""
    return [{k: v for k, v in o.items() if k not in ("id", "job_id")} for o in objects]


def increasing(frames: list[dict[str, Any]]) -> bool:
    positions = [f["position"] for f in frames]
    return all(a < b for a, b in itertools.pairwise(positions))


# -- tests -----------------------------------------------------------------------------


async def test_objects_arrive_one_by_one_before_completion_and_match_the_canvas(
    system: System,
) -> None:
    gate = uuid.uuid4().hex
    async with User(system) as alice:
        async with alice.socket() as socket:
            job_id, canvas_id = await alice.submit(
                f"a flowchart of a checkout [[fake:objects=10,gate={gate}]]"
            )
            # The reply waits at its gate, halfway: objects already on the client's screen
            # were sent while the model was still writing.
            first = (await socket.until(job_id, PROGRESS))[-1]
            assert first["data"]["index"] == 0
            assert socket.of(job_id, COMPLETED) == []
            assert (await alice.status(job_id))["status"] == "processing"

            system.stand_in.open_gate(gate)
            frames = await socket.until(job_id, COMPLETED)

        types = [f["type"] for f in frames]
        assert types[:2] == ["ai_job_queued", "ai_generation_started"]
        assert types[2:] == [PROGRESS] * 10 + [COMPLETED]
        progress = frames[2:-1]
        assert [f["data"]["index"] for f in progress] == list(range(10))
        assert len({f["data"]["attempt_id"] for f in progress}) == 1
        assert increasing(frames)
        assert all(f["canvas_id"] == canvas_id for f in frames)

        completed = frames[-1]["data"]
        status = await alice.status(job_id)
        assert status["status"] == "completed"
        assert status["result"]["object_ids"] == completed["object_ids"]
        assert completed["object_count"] == 10
        # The canvas holds exactly the objects shown, in the order shown.
        on_canvas = await alice.objects(canvas_id)
        assert [o["id"] for o in on_canvas] == completed["object_ids"]
        assert drawn(on_canvas) == [f["data"]["object"] for f in progress]
        assert all(o["job_id"] == job_id for o in on_canvas)

        recorded = [e for e in await alice.events(job_id) if e["type"] == "GenerationProgressed"]
        assert [e["position"] for e in recorded] == [f["position"] for f in progress]


async def test_stream_cut_midway_is_retried_and_the_history_shows_the_failed_attempt(
    system: System,
) -> None:
    async with User(system) as bob:
        async with bob.socket() as socket:
            # The stand-in cuts the first reply to this message halfway, then answers whole.
            job_id, canvas_id = await bob.submit(
                f"a retried drawing {uuid.uuid4().hex} [[fake:objects=8,cut,first=1]]"
            )
            frames = await socket.until(job_id, COMPLETED)

        status = await bob.status(job_id)
        assert (status["status"], status["retry_count"]) == ("completed", 1)
        events = await bob.events(job_id)
        types = [e["type"] for e in events]
        failed_at = types.index("GenerationFailed")
        failed = events[failed_at]["data"]
        assert (failed["kind"], failed["retryable"]) == ("bad_output", True)
        assert "cut off" in failed["error"]
        # The first attempt streamed some objects before its cut; they stay in its history.
        first_attempt = types[: failed_at + 1]
        assert first_attempt[:4] == [
            "JobRequested",
            "JobQueued",
            "GenerationRequested",
            "GenerationStarted",
        ]
        assert first_attempt[4:-1] and set(first_attempt[4:-1]) == {"GenerationProgressed"}
        assert types[failed_at + 1 : failed_at + 5] == [
            "JobRetryScheduled",
            "JobQueued",
            "GenerationRequested",
            "GenerationStarted",
        ]
        assert types[failed_at + 5 :] == ["GenerationProgressed"] * 8 + [
            "GenerationSucceeded",
            "JobCompleted",
        ]
        attempts = [e["data"]["attempt_id"] for e in events if e["type"] == "GenerationRequested"]
        assert len(set(attempts)) == 2

        # On the WebSocket: the error (not final), then the second attempt's objects.
        error = next(f for f in frames if f["type"] == "ai_job_error")
        assert (error["data"]["retryable"], error["data"]["final"]) == (True, False)
        retried = [
            f for f in frames if f["type"] == PROGRESS and f["data"]["attempt_id"] == attempts[1]
        ]
        assert [f["data"]["index"] for f in retried] == list(range(8))
        assert all(f["position"] > error["position"] for f in retried)
        assert increasing(frames)
        # The canvas holds the second attempt's objects only.
        assert drawn(await bob.objects(canvas_id)) == [f["data"]["object"] for f in retried]


async def test_reconnecting_client_receives_the_progress_it_missed(system: System) -> None:
    gate = uuid.uuid4().hex
    async with User(system) as carol:
        async with carol.socket() as socket:
            job_id, _ = await carol.submit(f"a resumed drawing [[fake:objects=10,gate={gate}]]")
            first = (await socket.until(job_id, PROGRESS))[-1]
        # Disconnected. At least one more object is recorded before the client is back,
        # and the rest (held at the gate) after: both must reach it, once each.
        await eventually(
            lambda: _recorded(carol, job_id, "GenerationProgressed", 2),
            what="a second object recorded",
        )
        async with carol.socket(after=first["position"]) as socket:
            system.stand_in.open_gate(gate)
            frames = await socket.until(job_id, COMPLETED)

    assert [f["type"] for f in frames] == [PROGRESS] * 9 + [COMPLETED]
    assert [f["data"]["index"] for f in frames[:-1]] == list(range(1, 10))
    assert all(f["position"] > first["position"] for f in frames)
    assert increasing(frames)
    positions = [f["position"] for f in frames]
    assert len(set(positions)) == len(positions)


async def _recorded(person: User, job_id: str, event_type: str, count: int) -> bool:
    return [e["type"] for e in await person.events(job_id)].count(event_type) >= count


async def test_job_cancelled_midway_leaves_no_objects_on_the_canvas(system: System) -> None:
    gate = uuid.uuid4().hex
    async with User(system) as dave:
        async with dave.socket() as socket:
            before = system.stand_in.stats()
            job_id, canvas_id = await dave.submit(
                f"a drawing never finished [[fake:objects=10,gate={gate}]]"
            )
            await socket.until(job_id, PROGRESS)
            cancel = await dave.cancel(job_id)
            assert cancel.status_code == 202
            await dave.until_status(job_id, "cancelled")
            await socket.until(job_id, "ai_job_cancelled")

            # The model call was aborted in the middle of its stream.
            def call_abandoned() -> bool:
                stats = system.stand_in.stats()
                return bool(
                    stats["in_flight"] == before["in_flight"]
                    and stats["abandoned"] == before["abandoned"] + 1
                )

            await eventually(call_abandoned, what="the stand-in to see the stream abandoned")
            system.stand_in.open_gate(gate)  # nobody waits there any more

        assert await dave.objects(canvas_id) == []
        types = [e["type"] for e in await dave.events(job_id)]
        assert "GenerationProgressed" in types
        assert "GenerationSucceeded" not in types and "JobCompleted" not in types
        assert types[-1] == "JobCancelled"
        assert (await dave.status(job_id))["result"] is None
