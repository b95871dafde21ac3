"""Connections to the orchestrator's database: JSON columns as Python values."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    """Decode json/jsonb columns to Python values and encode them from Python values."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def connect(
    dsn: str, *, timeout: float = 5.0, application_name: str | None = None
) -> asyncpg.Connection:
    """One connection outside the pool (the relay's, the rebuild command's)."""
    settings = {"application_name": application_name} if application_name else None
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=timeout, server_settings=settings)
    try:
        await init_connection(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections have :func:`init_connection` applied."""
    pool: asyncpg.Pool | None = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init_connection, timeout=5
    )
    assert pool is not None
    return pool
