"""Connections' outboxes without a network: bounds, ordering, replay and its seam."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from canvas_notifier.frames import Frame, Target
from canvas_notifier.hub import TOO_SLOW, Client, Hub, Offer


def frame(position: int, job_id: str = "j1") -> Frame:
    return Frame(
        position=position,
        type="ai_job_queued",
        job_id=job_id,
        canvas_id="c1",
        data=orjson.dumps({"position": position, "job_id": job_id}),
    )


async def drain(client: Client) -> list[int]:
    """Everything the sender would send now, as positions (control frames as -1)."""
    sent = []
    while client.pending or client._control:
        body = orjson.loads(await client.next_data())
        sent.append(body.get("position", -1))
    return sent


async def test_live_frames_go_out_in_order():
    client = Client("alice", limit=10)
    for position in (1, 2, 3):
        assert client.offer(frame(position)) is Offer.QUEUED
    assert await drain(client) == [1, 2, 3]


async def test_a_duplicate_live_frame_is_dropped():
    client = Client("alice", limit=10)
    client.offer(frame(1))
    client.offer(frame(2))
    assert client.offer(frame(2)) is Offer.DUPLICATE
    assert client.offer(frame(1)) is Offer.DUPLICATE
    assert await drain(client) == [1, 2]


async def test_a_full_outbox_asks_to_close_with_4008_and_takes_nothing_more():
    client = Client("alice", limit=2)
    client.offer(frame(1))
    client.offer(frame(2))
    assert client.offer(frame(3)) is Offer.OVERFLOW
    assert client.kick is not None
    assert client.kick.code == TOO_SLOW
    assert "reconnect with after=" in client.kick.reason
    assert client.offer(frame(4)) is Offer.CLOSING
    assert (await client.wait_kicked()).code == TOO_SLOW


async def test_the_4008_reason_names_the_last_position_sent():
    client = Client("alice", limit=1)
    client.offer(frame(5))
    await client.next_data()
    client.offer(frame(6))
    client.offer(frame(7))
    assert client.kick is not None
    assert client.kick.reason.endswith("after=5")


async def test_a_slow_client_never_affects_another_clients_outbox():
    hub = Hub()
    slow, fast = Client("alice", limit=1), Client("alice", limit=10)
    hub.add(slow)
    hub.add(fast)
    taken, _ = hub.deliver("alice", frame(1))
    assert taken == 2
    for position in (2, 3):
        hub.deliver("alice", frame(position))
    assert slow.kick is not None
    assert fast.kick is None
    assert await drain(fast) == [1, 2, 3]


async def test_deliver_reaches_only_the_events_user():
    hub = Hub()
    alice, bob = Client("alice", limit=10), Client("bob", limit=10)
    hub.add(alice)
    hub.add(bob)
    assert hub.deliver("alice", frame(1)) == (1, [])
    assert alice.pending == 1
    assert bob.pending == 0
    hub.remove(alice)
    assert hub.deliver("alice", frame(2)) == (0, [])
    assert len(hub) == 1


async def test_replay_then_release_sends_each_position_once_in_order():
    client = Client("alice", limit=10)
    client.last_position = 2
    client.hold()
    # Live frames arrive while the replay reads the store, some of them in it too.
    for position in (4, 5, 6):
        client.offer(frame(position))
    for position in (3, 4, 5):
        assert await client.replay(frame(position))
    await asyncio.wait_for(_drain_until_empty(client), 5)
    client.release()
    client.offer(frame(6))  # redelivered by the broker: a duplicate
    client.offer(frame(7))
    assert await drain(client) == [6, 7]
    assert client.last_sent == 7


async def _drain_until_empty(client: Client) -> list[int]:
    sent = []
    waiter = asyncio.create_task(client.wait_drained())
    while not waiter.done():
        sent.append(orjson.loads(await client.next_data())["position"])
        await asyncio.sleep(0)
    return sent


async def test_replay_waits_for_room_instead_of_overflowing():
    client = Client("alice", limit=2)
    client.hold()
    assert await client.replay(frame(1))
    assert await client.replay(frame(2))
    third = asyncio.create_task(client.replay(frame(3)))
    await asyncio.sleep(0)
    assert not third.done()
    await client.next_data()
    assert await asyncio.wait_for(third, 5)
    assert client.kick is None


async def test_control_frames_jump_the_queue():
    client = Client("alice", limit=10)
    client.offer(frame(1))
    client.say(b'{"type": "subscribed"}')
    assert orjson.loads(await client.next_data()) == {"type": "subscribed"}
    assert orjson.loads(await client.next_data())["position"] == 1


async def test_a_subscription_filters_frames_already_queued():
    client = Client("alice", limit=10)
    client.offer(frame(1, job_id="j1"))
    client.offer(frame(2, job_id="j2"))
    client.subscription = client.subscription.add(Target("job_id", "j2"))
    assert orjson.loads(await client.next_data())["position"] == 2
    assert client.pending == 0


async def test_a_client_that_sends_but_never_reads_is_closed():
    client = Client("alice", limit=10)
    for _ in range(100):
        client.say(b'{"type": "error"}')
    assert client.kick is not None
    assert client.kick.code == TOO_SLOW


async def test_closing_wakes_a_replay_waiting_for_room():
    client = Client("alice", limit=1)
    client.hold()
    await client.replay(frame(1))
    waiting = asyncio.create_task(client.replay(frame(2)))
    await asyncio.sleep(0)
    client.close(1001, "going away")
    assert await asyncio.wait_for(waiting, 5) is False


# -- the writer: frames straight onto a socket that takes them -----------------------------


class Socket:
    """A writer that takes every frame until it is full, like a socket at its high-water mark."""

    def __init__(self) -> None:
        self.full = False
        self.written: list[int] = []

    def __call__(self, data: bytes) -> bool:
        if self.full:
            return False
        self.written.append(orjson.loads(data)["position"])
        return True


async def test_a_frame_goes_straight_to_a_socket_that_takes_it():
    socket = Socket()
    client = Client("alice", limit=10, writer=socket)
    assert client.offer(frame(1)) is Offer.SENT
    assert socket.written == [1]
    assert client.pending == 0
    assert client.last_sent == 1
    assert client.offer(frame(1)) is Offer.DUPLICATE


async def test_frames_wait_in_order_behind_the_first_one_the_socket_did_not_take():
    socket = Socket()
    client = Client("alice", limit=10, writer=socket)
    client.offer(frame(1))
    socket.full = True
    assert client.offer(frame(2)) is Offer.QUEUED
    socket.full = False
    # The socket would take it, but 2 waits: 3 must not overtake it.
    assert client.offer(frame(3)) is Offer.QUEUED
    assert socket.written == [1]
    assert await drain(client) == [2, 3]
    assert client.offer(frame(4)) is Offer.SENT
    assert socket.written == [1, 4]


def held_for_a_replay() -> Client:
    client = Client("alice", limit=2)
    client.hold()
    return client


def writing_to_a_full_socket() -> Client:
    socket = Socket()
    socket.full = True
    return Client("alice", limit=2, writer=socket)


@pytest.mark.parametrize("connection", [held_for_a_replay, writing_to_a_full_socket])
async def test_live_frames_waiting_beyond_the_bound_close_the_connection_with_4008(connection):
    """Frames held back for a replay, or behind a socket that takes nothing more, still
    fill the bounded outbox."""
    client = connection()
    client.offer(frame(1))
    client.offer(frame(2))
    assert client.offer(frame(3)) is Offer.OVERFLOW
    assert client.kick is not None
    assert client.kick.code == TOO_SLOW


async def test_nothing_is_written_directly_while_the_connection_replays():
    socket = Socket()
    client = Client("alice", limit=10, writer=socket)
    client.hold()
    assert client.offer(frame(1)) is Offer.QUEUED
    assert socket.written == []
    client.release()
    assert await drain(client) == [1]


async def test_a_waiting_control_frame_keeps_event_frames_behind_it():
    socket = Socket()
    client = Client("alice", limit=10, writer=socket)
    client.say(b'{"type": "subscribed"}')
    assert client.offer(frame(1)) is Offer.QUEUED
    assert socket.written == []
    assert await drain(client) == [-1, 1]


async def test_a_frame_outside_the_subscription_is_not_written_and_not_sent_later():
    socket = Socket()
    client = Client("alice", limit=10, writer=socket)
    client.subscription = client.subscription.add(Target("job_id", "j2"))
    assert client.offer(frame(1, job_id="j1")) is Offer.SENT
    assert client.offer(frame(2, job_id="j2")) is Offer.SENT
    assert socket.written == [2]
    assert client.pending == 0
    assert client.offer(frame(1, job_id="j1")) is Offer.DUPLICATE


async def test_the_hub_counts_each_connection_once():
    hub = Hub()
    alice, alice2, bob = Client("alice", limit=1), Client("alice", limit=1), Client("bob", limit=1)
    for client in (alice, alice2, bob, alice):
        hub.add(client)
    assert len(hub) == 3
    hub.remove(alice)
    hub.remove(alice)
    assert len(hub) == 2
    assert list(hub.clients("alice")) == [alice2]
