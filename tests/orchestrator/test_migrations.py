"""Migrations on the real Postgres: once each, however many orchestrators start at once."""

from __future__ import annotations

import asyncio

import asyncpg

from canvas_store.connections import connect
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
