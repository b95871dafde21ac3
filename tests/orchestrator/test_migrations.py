"""Migrations on the real Postgres: once each, however many orchestrators start at once."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import asyncpg

from canvas_events.envelope import Envelope
from canvas_events.events import JobQueued
from canvas_store.connections import connect
from canvas_store.events import append, read_after
from canvas_store.migrations import available, migrate


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


async def test_migrate_creates_the_schema_and_records_each_migration(database_url: str):
    conn = await connect(database_url)
    try:
        applied = await migrate(conn)

        assert applied == [name for name, _ in available()]
        assert applied[0] == "0001_event_store"
        assert {
            "events",
            "processed_messages",
            "relay_checkpoints",
            "jobs",
            "canvases",
            "canvas_objects",
            "schema_migrations",
        } <= await _tables(conn)
        recorded = await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")
        assert [row["name"] for row in recorded] == applied
    finally:
        await conn.close()


async def test_migrate_a_second_time_applies_nothing(database_url: str):
    conn = await connect(database_url)
    try:
        await migrate(conn)

        assert await migrate(conn) == []
    finally:
        await conn.close()


async def test_orchestrators_starting_at_once_apply_each_migration_exactly_once(
    database_url: str,
):
    conns = [await connect(database_url) for _ in range(6)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in conns))

        applied = [name for result in results for name in result]
        assert sorted(applied) == [name for name, _ in available()]
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(available())
    finally:
        for conn in conns:
            await conn.close()


async def test_events_recorded_before_0006_stay_first_in_the_global_order(database_url: str):
    conn = await connect(database_url)
    try:
        # A store as the releases before 0006 left it: identity positions 1, 2, 3.
        await conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz "
            "NOT NULL DEFAULT now())"
        )
        for name, sql in available():
            if name < "0006":
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
        old_stream = uuid4()
        for version in (1, 2, 3):
            await conn.execute(
                "INSERT INTO events (stream_id, version, event_id, type, schema_version, "
                "occurred_at, correlation_id, user_id, data) "
                "VALUES ($1, $2, $3, 'JobQueued', 1, now(), 'c', 'alice', '{}')",
                old_stream,
                version,
                uuid4(),
            )

        # 0006 first; the later ones after it.
        assert (await migrate(conn))[0] == "0006_positions_without_a_lock"
        new_stream = uuid4()
        async with conn.transaction():
            envelope = Envelope.wrap(
                JobQueued(priority=5, retry_count=0),
                correlation_id="c",
                job_id=new_stream,
                user_id="alice",
            )
            [new] = await append(conn, new_stream, 0, [envelope])

        read = await read_after(conn, 0, 10)
        assert [(item.stream_id, item.version) for item in read] == [
            (old_stream, 1),
            (old_stream, 2),
            (old_stream, 3),
            (new_stream, 1),
        ]
        assert [item.position for item in read][:3] == [1, 2, 3]
        assert new.position > 3
    finally:
        await conn.close()
