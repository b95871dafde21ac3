"""What the broker tests share: envelopes to publish, and a fake clock for the in-memory one."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from canvas_events.envelope import Envelope, utcnow
from canvas_events.events import GenerationRequested, JobRequested


def job_requested(query: str = "draw a box") -> Envelope:
    """A JobRequested as the gateway publishes it."""
    return Envelope.wrap(
        JobRequested(query=query, canvas_id="c", priority=5),
        correlation_id="test",
        job_id=uuid.uuid4(),
        user_id="alice",
    )


def generation_requested() -> Envelope:
    """A GenerationRequested as the relay publishes it."""
    event = GenerationRequested(
        attempt_id=uuid.uuid4(),
        attempt=1,
        query="draw a box",
        priority=5,
        lease_expires_at=utcnow() + timedelta(minutes=5),
    )
    return Envelope.wrap(event, correlation_id="test", job_id=uuid.uuid4(), user_id="alice")


class FakeTime:
    """A clock that moves only when the broker pauses: ``sleep`` records the pause,
    moves the clock on by it and returns at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)
