"""The ledger sweep: an accepted job the orchestrator does not record is sent again, and
given up with a reason after LEDGER_MAX_RESENDS tries (no orchestrator runs here: the
test plays it, reading the orchestrator's queue and writing its jobs row)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from canvas_events.envelope import Envelope
from canvas_store import ledger
from canvas_store.ledger import GIVEN_UP_ERROR
from tests.gateway.conftest import token
from tests.support.waiting import eventually

Take = Callable[[], Awaitable[tuple[str, Envelope]]]


async def test_a_job_never_recorded_is_sent_again_then_given_up_and_no_longer_counted(
    make_gateway: Callable[..., Any], orchestrator_queue: Take
) -> None:
    async with make_gateway(
        ledger_resend_after_seconds=0.2, ledger_max_resends=2, max_active_jobs_per_user=1
    ) as gateway:
        answer = await gateway.create()
        assert answer.status_code == 202, answer.text
        job_id = uuid.UUID(answer.json()["job_id"])

        sent = [await orchestrator_queue() for _ in range(4)]

        assert [envelope.type for _, envelope in sent] == [
            "JobRequested",
            "JobRequested",
            "JobRequested",
            # Given up: a copy still on its way is recorded cancelled, never run.
            "JobCancelRequested",
        ]
        assert {envelope.job_id for _, envelope in sent} == {job_id}
        # Each copy is a message of its own, for the same job and request.
        assert len({envelope.event_id for _, envelope in sent}) == 4
        assert len({envelope.correlation_id for _, envelope in sent}) == 1

        async def failed() -> dict[str, Any] | None:
            status = await gateway.client.get(
                f"/api/ai-agent/job/{job_id}/status", headers=token("alice")
            )
            body: dict[str, Any] = status.json()
            return body if body["status"] == "failed" else None

        status = await eventually(failed, what="the given-up job to read failed")
        assert status["error_message"] == GIVEN_UP_ERROR.format(tries=3)
        assert status["completed_at"] is not None
        # It no longer counts against the user's limit of one unfinished job.
        again = await gateway.create()
        assert again.status_code == 202, again.text


async def test_a_job_the_orchestrator_recorded_is_never_sent_again(
    make_gateway: Callable[..., Any], orchestrator_queue: Take
) -> None:
    async with make_gateway(ledger_resend_after_seconds=0.2) as gateway:
        answer = await gateway.create()
        assert answer.status_code == 202
        job_id = uuid.UUID(answer.json()["job_id"])
        _, first = await orchestrator_queue()
        await gateway.insert_job("alice", id=job_id, canvas_id=answer.json()["canvas_id"])

        async def marked() -> bool:
            rows = await gateway.sql(
                "SELECT recorded_at FROM gateway_job_requests WHERE job_id = $1", job_id
            )
            return rows[0]["recorded_at"] is not None

        await eventually(marked, what="the ledger row to be marked recorded")
        await asyncio.sleep(1.0)  # five resend intervals
        rows = await gateway.sql(
            "SELECT resends FROM gateway_job_requests WHERE job_id = $1", job_id
        )
        assert first.job_id == job_id
        assert rows[0]["resends"] == 0


async def test_requests_published_together_are_confirmed_together(
    make_gateway: Callable[..., Any], monkeypatch: Any
) -> None:
    statements: list[int] = []
    confirm = ledger.confirm

    async def counted(conn: Any, job_ids: list[uuid.UUID]) -> None:
        statements.append(len(job_ids))
        await confirm(conn, job_ids)

    monkeypatch.setattr(ledger, "confirm", counted)
    burst = 40
    async with make_gateway(max_active_jobs_per_user=burst) as gateway:
        answers = await asyncio.gather(*(gateway.create() for _ in range(burst)))
        assert [answer.status_code for answer in answers] == [202] * burst

        rows = await gateway.sql("SELECT confirmed_at FROM gateway_job_requests")
    assert len(rows) == burst
    assert all(row["confirmed_at"] is not None for row in rows)
    assert sum(statements) == burst
    # Confirms that waited together went in one UPDATE each time: far fewer than 40.
    assert len(statements) < burst / 2, statements
