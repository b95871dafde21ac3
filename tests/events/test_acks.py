"""Acks sent together: what a consuming channel acks, and when.

The bookkeeping is pure logic, tested on a channel that records the frames it is asked
to send; then, on the real RabbitMQ, a burst settled together is acked in a few frames,
and a stop leaves nothing unacked behind it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import ACK, Acks, Outcome
from canvas_events.envelope import Envelope
from tests.events.brokers import KEY, OnRabbitMQ
from tests.events.memory import job_requested


class Channel:
    """Records the acks it is asked to send, as (delivery tag, multiple)."""

    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.acks.append((delivery_tag, multiple))


def _acks(channel: Channel, **options: Any) -> Acks:
    return Acks(channel, **options)  # type: ignore[arg-type]


async def _turn() -> None:
    """Let the event loop run what the acks scheduled (and the sends they started)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_run_of_settled_messages_is_acked_with_one_frame() -> None:
    channel = Channel()
    acks = _acks(channel)
    for tag in range(1, 11):
        acks.delivered(tag)
    for tag in (3, 1, 2, 5, 4):
        acks.ack(tag)
    await _turn()

    assert channel.acks == [(5, True)]


async def test_a_message_still_in_hand_holds_later_acks_back_then_they_go_alone() -> None:
    channel = Channel()
    acks = _acks(channel, straggler_delay=0.01)
    for tag in (1, 2, 3):
        acks.delivered(tag)
    acks.ack(2)
    acks.ack(3)
    await _turn()
    assert channel.acks == []  # 1 is still in hand: a multiple ack would cover it

    await asyncio.sleep(0.05)
    assert sorted(channel.acks) == [(2, False), (3, False)]

    acks.ack(1)
    await _turn()
    # 1 alone: 2 and 3 were acked already, a multiple ack of 1 covers nothing else.
    assert channel.acks[2:] == [(1, True)]


async def test_a_nacked_message_is_never_covered_by_a_multiple_ack() -> None:
    channel = Channel()
    acks = _acks(channel)
    for tag in (1, 2, 3):
        acks.delivered(tag)
    acks.ack(1)
    acks.ack(3)
    await _turn()
    assert channel.acks == [(1, True)]

    acks.nacked(2)  # its nack is queued: 3 may now be acked with the run
    await _turn()
    assert channel.acks == [(1, True), (3, True)]


async def test_flush_sends_every_settled_ack_at_once() -> None:
    channel = Channel()
    acks = _acks(channel, straggler_delay=60)
    for tag in (1, 2, 3, 4):
        acks.delivered(tag)
    acks.ack(1)
    acks.ack(3)
    acks.flush()
    await acks.sent()

    assert channel.acks == [(1, True), (3, False)]


async def test_a_burst_on_rabbitmq_is_acked_in_a_few_frames_and_nothing_stays_unacked(
    rabbitmq: OnRabbitMQ, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[int, bool]] = []
    basic_ack = aiormq.Channel.basic_ack

    async def counted(
        self: aiormq.Channel, delivery_tag: int, multiple: bool = False, wait: bool = True
    ) -> None:
        sent.append((delivery_tag, multiple))
        await basic_ack(self, delivery_tag, multiple, wait)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", counted)
    messages = 50
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        handled.append(str(envelope.event_id))
        if len(handled) == messages:
            release.set()
        await release.wait()  # every message settles at once, as a group commit's do
        return ACK

    broker = await rabbitmq.started(handler, prefetch=messages)
    for _ in range(messages):
        await broker.publish(job_requested(), KEY)
    await asyncio.wait_for(release.wait(), 10)
    queue = rabbitmq.topology.orchestrator.name

    async def drained() -> bool:
        return await broker.queue_stats(queue) == (0, 1) and bool(sent)

    for _ in range(200):
        if await drained():
            break
        await asyncio.sleep(0.02)
    await broker.stop()

    assert len(handled) == messages
    assert len(sent) <= 3, sent  # one multiple ack, or a few: not 50
    assert all(multiple for _, multiple in sent)
    # Nothing was left unacked: a new consumer finds the queue empty.
    again = OnRabbitMQ(rabbitmq.url, rabbitmq.topology)
    seen: list[Envelope] = []

    async def record(envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        seen.append(envelope)
        return ACK

    try:
        await again.started(record)
        await asyncio.sleep(0.5)
        assert seen == []
    finally:
        await again.stop()
