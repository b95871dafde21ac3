"""Schema migrations: ``migrations/NNNN_*.sql`` applied in name order, once each.

Every orchestrator runs them at start. A session advisory lock makes concurrent starts
take turns: the first applies what is missing, the others then find nothing to do.
Each file runs in its own transaction together with its ``schema_migrations`` row.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

import asyncpg
import structlog

log = structlog.get_logger("canvas_store.migrations")

MIGRATION_LOCK_KEY: Final = 0x63616E7661730003


def available() -> list[tuple[str, str]]:
    """(name, SQL) of every migration shipped with this build, in the order to apply."""
    folder = resources.files("canvas_store") / "migrations"
    files = sorted(
        (item for item in folder.iterdir() if item.name.endswith(".sql")),
        key=lambda item: item.name,
    )
    return [(item.name.removesuffix(".sql"), item.read_text(encoding="utf-8")) for item in files]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations this database lacks; return the names applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                name       text        PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations")}
        applied = []
        for name, sql in available():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            log.info("migration applied", migration=name)
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def migrate_pool(pool: asyncpg.Pool) -> None:
    """:func:`migrate` on a connection of ``pool`` (the Database's on_connect hook)."""
    async with pool.acquire() as conn:
        await migrate(conn)
