"""The event store on the real Postgres: streams, optimistic concurrency, global order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from uuid import UUID, uuid4

import asyncpg
import pytest

from canvas_events.envelope import Envelope
from canvas_events.events import JobCancelRequested, JobQueued
from canvas_store.errors import ConcurrencyError
from canvas_store.events import (
    NOTIFY_CHANNEL,
    Append,
    RecordedEvent,
    append,
    append_streams,
    held_by_other_databases,
    last_position,
    load,
    read_after,
    read_settled_after,
    user_events_after,
    user_head,
)
from tests.support.env import transaction_in_another_database
from tests.support.waiting import eventually


def _envelope(stream_id: UUID, retry_count: int = 0) -> Envelope:
    return Envelope.wrap(
        JobQueued(priority=5, retry_count=retry_count),
        correlation_id="corr-1",
        job_id=stream_id,
        user_id="alice",
        canvas_id="canvas-1",
    )


async def _append(
    pool: asyncpg.Pool, stream_id: UUID, version: int, count: int = 1
) -> list[RecordedEvent]:
    async with pool.acquire() as conn, conn.transaction():
        return await append(
            conn, stream_id, version, [_envelope(stream_id, n) for n in range(count)]
        )


async def test_appended_events_load_back_in_version_order_with_their_envelopes(pool):
    stream_id = uuid4()
    sent = [_envelope(stream_id, n) for n in range(3)]
    async with pool.acquire() as conn, conn.transaction():
        recorded = await append(conn, stream_id, 0, sent)

    async with pool.acquire() as conn:
        loaded = await load(conn, stream_id)

    assert [item.version for item in loaded] == [1, 2, 3]
    assert loaded == recorded
    for item, envelope in zip(loaded, sent, strict=True):
        assert item.envelope.event_id == envelope.event_id
        assert item.envelope.data == envelope.data
        assert item.envelope.occurred_at == envelope.occurred_at
        assert item.envelope.position == item.position
        assert item.envelope.job_id == stream_id


async def test_each_event_keeps_the_traceparent_it_was_appended_with(pool):
    first, second = uuid4(), uuid4()
    traced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with pool.acquire() as conn, conn.transaction():
        recorded = await append_streams(
            conn,
            [
                Append(first, 0, [_envelope(first, 0), _envelope(first, 1)], [traced, None]),
                Append(second, 0, [_envelope(second)]),  # none given: none kept
            ],
        )
    assert [item.traceparent for item in recorded] == [traced, None, None]

    async with pool.acquire() as conn:
        assert [item.traceparent for item in await load(conn, first)] == [traced, None]

    # A reader's copy carries it too. (Eventually: the horizon is the whole cluster's,
    # and a transaction of another database, briefly open, holds the read back.)
    async def read_second() -> RecordedEvent | None:
        async with pool.acquire() as conn:
            read = await read_after(conn, 0, 10)
        return next((item for item in read if item.stream_id == second), None)

    assert (
        await eventually(read_second, timeout=10, what="the second stream read")
    ).traceparent is None
    assert await _traceparent_of(pool, recorded[0].envelope.event_id) == traced


async def _traceparent_of(pool: asyncpg.Pool, event_id: UUID) -> str | None:
    value: str | None = await pool.fetchval(
        "SELECT traceparent FROM events WHERE event_id = $1", event_id
    )
    return value


async def test_positions_of_one_append_follow_its_versions(pool):
    stream_id = uuid4()

    recorded = await _append(pool, stream_id, 0, count=5)

    positions = [item.position for item in recorded]
    assert positions == sorted(positions)
    assert len(set(positions)) == 5


async def test_unknown_stream_loads_empty(pool):
    async with pool.acquire() as conn:
        assert await load(conn, uuid4()) == []
        assert await last_position(conn) == 0


async def test_append_with_a_stale_version_raises_concurrency_error_and_changes_nothing(pool):
    stream_id = uuid4()
    await _append(pool, stream_id, 0, count=2)

    with pytest.raises(ConcurrencyError):
        await _append(pool, stream_id, 1)

    async with pool.acquire() as conn:
        assert [item.version for item in await load(conn, stream_id)] == [1, 2]


async def test_two_writers_of_one_version_one_wins_and_the_other_gets_a_conflict(pool):
    stream_id = uuid4()
    await _append(pool, stream_id, 0)

    results = await asyncio.gather(
        _append(pool, stream_id, 1), _append(pool, stream_id, 1), return_exceptions=True
    )

    assert sum(isinstance(result, ConcurrencyError) for result in results) == 1
    async with pool.acquire() as conn:
        assert len(await load(conn, stream_id)) == 2


async def test_append_needs_the_callers_transaction(pool):
    async with pool.acquire() as conn:
        with pytest.raises(AssertionError):
            await append(conn, uuid4(), 0, [_envelope(uuid4())])


async def test_append_refuses_an_event_without_a_user(pool):
    envelope = Envelope.wrap(JobCancelRequested(), correlation_id="c", job_id=uuid4())
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(ValueError, match="user_id"):
            await append(conn, uuid4(), 0, [envelope])


async def _settled(pool: asyncpg.Pool) -> None:
    """Until every committed event is settled: no transaction older than the last one is
    still open anywhere in the cluster (another database's tests may hold one briefly)."""

    async def settled() -> bool:
        async with pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT COALESCE(max(position), 0) < canvas_settled_positions_below() "
                    "FROM events"
                )
            )

    await eventually(settled, timeout=10, what="every committed event settled")


async def test_read_after_pages_through_every_stream_in_position_order(pool):
    for _ in range(3):
        await _append(pool, uuid4(), 0, count=2)
    await _settled(pool)

    async with pool.acquire() as conn:
        first = await read_after(conn, 0, 4)
        rest = await read_after(conn, first[-1].position, 100)
        assert await last_position(conn) == rest[-1].position

    positions = [item.position for item in first + rest]
    assert len(first) == 4
    assert len(positions) == 6
    assert positions == sorted(set(positions))


async def test_a_reader_never_sees_a_later_position_before_an_earlier_one(pool):
    writers, appends_each = 8, 30
    start = await _last(pool)
    recorded: list[int] = []
    done = asyncio.Event()

    async def writer() -> None:
        for _ in range(appends_each):
            stream_id = uuid4()
            count = random.randint(1, 3)
            async with pool.acquire() as conn, conn.transaction():
                appended = await append(
                    conn, stream_id, 0, [_envelope(stream_id) for _ in range(count)]
                )
                # Hold the transaction open a little after the insert: younger
                # transactions (higher positions) then often commit first.
                await conn.execute("SELECT pg_sleep($1)", random.random() / 1000)
            recorded.extend(item.position for item in appended)

    async def reader() -> list[int]:
        seen: list[int] = []
        last = start
        async with pool.acquire() as conn:
            while True:
                finished = done.is_set()
                # held_back: committed events wait behind a transaction still open (any
                # in the cluster: another database's too), so the reader is not done.
                batch, held_back = await read_settled_after(conn, last, 50)
                for item in batch:
                    # A position at or below one already read: the reader would have
                    # passed it by (read_after asks for what follows the last one).
                    assert item.position > last, (last, item.position)
                    last = item.position
                    seen.append(item.position)
                if finished and not batch and not held_back:
                    return seen
                await asyncio.sleep(0)

    read = asyncio.create_task(reader())
    await asyncio.gather(*(writer() for _ in range(writers)))
    done.set()
    seen = await read

    # Every event, once, in position order: nothing skipped.
    assert seen == sorted(recorded)
    assert len(seen) == len(set(seen)) == sum(1 for _ in recorded)


async def test_a_reader_stops_below_a_transaction_still_in_flight(pool):
    start = await _last(pool)
    older, younger = uuid4(), uuid4()
    async with pool.acquire() as slow:
        transaction = slow.transaction()
        await transaction.start()
        try:
            [first] = await append(slow, older, 0, [_envelope(older)])
            [second] = await _append(pool, younger, 0)  # commits while the older is open
            assert second.position > first.position

            async with pool.acquire() as conn:
                # The younger one is committed, but an older transaction may still add a
                # smaller position: nothing after it is read yet.
                assert await read_after(conn, start, 10) == []
                assert await last_position(conn) <= start
                # ... and a reader is told that committed events wait behind it, also
                # one that leaves out other databases' transactions.
                assert await read_settled_after(conn, start, 10) == ([], True)
                assert await read_settled_after(conn, start, 10, here=True) == ([], True)
        finally:
            await transaction.commit()

    # Once it ended both are read, in order. (Eventually: the horizon is the whole
    # cluster's, and a transaction of another database, briefly open, holds it too.)
    async def settled() -> list[int] | None:
        async with pool.acquire() as conn:
            read, held_back = await read_settled_after(conn, start, 10)
        return None if held_back else [item.position for item in read]

    assert await eventually(settled, timeout=10, what="both events settled") == [
        first.position,
        second.position,
    ]


async def test_an_append_overtaken_by_a_younger_transaction_conflicts_and_succeeds_again(pool):
    stream_id = uuid4()
    async with pool.acquire() as old:
        transaction = old.transaction()
        await transaction.start()
        try:
            await old.execute("SELECT pg_current_xact_id()")  # its id: older than the next
            [version_1] = await _append(pool, stream_id, 0)  # younger, committed first
            with pytest.raises(ConcurrencyError, match="younger transaction"):
                await append(old, stream_id, 1, [_envelope(stream_id, 1)])
        finally:
            await transaction.rollback()

    [version_2] = await _append(pool, stream_id, 1)  # decided again: a younger transaction

    assert version_2.position > version_1.position
    async with pool.acquire() as conn:
        assert [item.version for item in await load(conn, stream_id)] == [1, 2]


async def test_one_transaction_appends_at_most_4096_events(pool):
    stream_id = uuid4()
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.ProgramLimitExceededError, match="4096"):
            async with conn.transaction():
                await append(conn, stream_id, 0, [_envelope(stream_id) for _ in range(4097)])
        assert await load(conn, stream_id) == []


async def _last(pool: asyncpg.Pool) -> int:
    """The highest position so far, settled or not."""
    async with pool.acquire() as conn:
        value: int = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
        return value


async def test_an_append_notifies_listeners_when_it_commits(pool, database_url):
    listener = await asyncpg.connect(database_url)
    woken = asyncio.Event()
    await listener.add_listener(NOTIFY_CHANNEL, lambda *_: woken.set())
    try:
        stream_id = uuid4()
        async with pool.acquire() as conn, conn.transaction():
            await append(conn, stream_id, 0, [_envelope(stream_id)])

        await asyncio.wait_for(woken.wait(), 5)
    finally:
        await listener.close()


async def test_a_transaction_open_in_another_database_holds_no_reader_back(pool, database_url):
    """A write transaction left open in another database of the cluster (a batch job, a
    session idle in a transaction) cannot append here: a reader that asks for this
    database's bound goes on. One left open in this database still holds it back."""
    start = await _last(pool)
    # Its transaction id is older than every event appended below.
    async with transaction_in_another_database(database_url):
        stream_id = uuid4()
        appended = await _append(pool, stream_id, 0, count=2)
        # The cluster's bound holds them back; a reader that asks for this database's
        # own reads them.
        async with pool.acquire() as conn:
            assert await read_settled_after(conn, start, 10) == ([], True)
            assert await held_by_other_databases(conn)

        async def read() -> list[int] | None:
            async with pool.acquire() as conn:
                events, held_back = await read_settled_after(conn, start, 10, here=True)
            positions = [item.position for item in events]
            return None if held_back else positions

        assert await eventually(read, timeout=10, what="the events read") == [
            item.position for item in appended
        ]


async def test_a_users_replay_reads_as_far_as_the_relay_does(pool, database_url):
    """The relay reads past another database's open transaction (above): so does a
    user's replay after a reconnect, as far as the relay read (the floor its reads
    raise), else it would leave out events the relay already published. One open in this
    database holds both back."""
    user_id = f"user-{uuid4().hex[:8]}"

    async def append_for_user() -> list[RecordedEvent]:
        stream_id = uuid4()
        envelope = _envelope(stream_id).model_copy(update={"user_id": user_id})
        async with pool.acquire() as conn, conn.transaction():
            return await append(conn, stream_id, 0, [envelope])

    async def replay() -> tuple[list[int], int]:
        envelopes = await user_events_after(pool, user_id, 0, ["JobQueued"], 10)
        return [item.position or 0 for item in envelopes], await user_head(pool, user_id)

    async with transaction_in_another_database(database_url):
        [first] = await append_for_user()
        # Held back by the cluster's bound, until a reader leaves other databases out
        # (the relay, which then publishes it): from then on the replay reads it too.
        assert await replay() == ([], 0)
        async with pool.acquire() as conn:
            read, _ = await read_settled_after(conn, 0, 100_000, here=True)
        assert first.position in [item.position for item in read]
        assert await replay() == ([first.position], first.position)

    async with pool.acquire() as slow:
        transaction = slow.transaction()
        await transaction.start()
        await slow.fetchval("SELECT pg_current_xact_id()")
        [second] = await append_for_user()
        assert await replay() == ([first.position], first.position)
        await transaction.rollback()
    assert await eventually(
        lambda: _if_settled(replay, second.position), what="the second event settled"
    ) == ([first.position, second.position], second.position)


async def _if_settled(
    replay: Callable[[], Awaitable[tuple[list[int], int]]], position: int
) -> tuple[list[int], int] | None:
    read = await replay()
    return read if read[1] == position else None
