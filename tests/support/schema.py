"""The orchestrator's schema (canvas_store's migrations) on a test's own database, for the
tests of the services that read its tables without running the orchestrator."""

from __future__ import annotations

import asyncpg

from canvas_store.migrations import migrate


async def apply_orchestrator_schema(database_url: str) -> None:
    """Apply every migration to ``database_url``, as the orchestrator does at start."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
