"""Deliveries: what happens to a delivered message, decided apart from any transport.
The real Broker and the in-memory one both carry out these verdicts."""

from __future__ import annotations

from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import (
    ACK,
    ATTEMPTS_HEADER,
    Consumer,
    DeadLetter,
    Deliveries,
    Outcome,
    Redeliver,
    Requeue,
    Retry,
    Verdict,
)
from canvas_events.envelope import Envelope
from canvas_events.errors import PoisonMessage
from canvas_events.testing import delivered_message
from canvas_events.topology import Topology
from tests.events.memory import job_requested

TOPOLOGY = Topology(prefix="mem")


async def verdict_on(
    result: Outcome | BaseException | None,
    *,
    attempts: int | None = None,
    body: bytes | None = None,
) -> tuple[Verdict, int]:
    """The verdict on one delivery whose handler returns (or raises) ``result``, and how
    often the handler ran; 5 attempts at most, 0.5 s apart."""
    calls = 0

    async def handler(envelope: Envelope, _: AbstractIncomingMessage) -> Outcome | None:
        nonlocal calls
        calls += 1
        if isinstance(result, BaseException):
            raise result
        return result

    consumer = Consumer(TOPOLOGY.orchestrator, handler, max_attempts=5, retry_delay=0.5)
    headers: dict[str, Any] | None = None if attempts is None else {ATTEMPTS_HEADER: attempts}
    message = delivered_message(
        job_requested() if body is None else body, "gateway.JobRequested", headers=headers
    )
    return await Deliveries().handle(consumer, message), calls


@pytest.mark.parametrize(
    ("result", "attempts", "verdict"),
    [
        (None, None, ACK),
        (ACK, None, ACK),
        (Retry("later", delay=2.0), None, Redeliver(attempts=1, delay=2.0)),
        (Retry("later", delay=2.0), 3, Redeliver(attempts=4, delay=2.0)),
        (Retry("later"), 4, DeadLetter("failed 5 times; last: later")),
        (RuntimeError("bug"), None, Redeliver(attempts=1, delay=0.5)),
        (RuntimeError("bug"), 4, DeadLetter("failed 5 times; last: RuntimeError: bug")),
        (DeadLetter("why"), None, DeadLetter("why")),
        (PoisonMessage("bad"), None, DeadLetter("bad")),
        (PoisonMessage("bad"), 4, DeadLetter("bad")),
    ],
)
async def test_what_the_handler_says_decides_the_verdict(
    result: Outcome | BaseException | None, attempts: int | None, verdict: Verdict
) -> None:
    assert await verdict_on(result, attempts=attempts) == (verdict, 1)


async def test_an_outage_requeues_whatever_the_count_after_a_pause() -> None:
    verdict, calls = await verdict_on(ConnectionResetError("reset by peer"), attempts=99)
    assert isinstance(verdict, Requeue)
    assert 0.4 <= verdict.delay <= 0.6  # retry_delay, with jitter
    assert calls == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "body is not JSON"),
        (b"[]", "body is not a JSON object"),
        (b'{"type": "JobRequested"}', "not a valid envelope"),
        (
            job_requested().model_copy(update={"type": "JobExploded"}).to_json(),
            "unknown event type 'JobExploded'",
        ),
        (
            job_requested().model_copy(update={"schema_version": 99}).to_json(),
            "JobRequested schema_version 99 is newer than this build's",
        ),
    ],
)
async def test_an_unreadable_body_is_dead_lettered_before_the_handler_runs(
    body: bytes, reason: str
) -> None:
    verdict, calls = await verdict_on(ACK, body=body)
    assert isinstance(verdict, DeadLetter)
    assert verdict.reason.startswith(reason)
    assert calls == 0
