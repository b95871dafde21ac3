"""Connections to the canvas-jobs database: JSON columns as Python values, the
services' session settings, one way for every pool and every single connection."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg
import orjson

from canvas_events.postgres import SESSION_SETTINGS


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=_unknown).decode()


def _unknown(value: Any) -> str:
    """What orjson does not take itself: asyncpg's own UUID type (a subclass of
    uuid.UUID, which orjson takes only exactly), as rows hand it back."""
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


async def init_connection(conn: asyncpg.Connection) -> None:
    """Decode json and jsonb columns to Python values and encode them from Python values
    (a pool's ``init``)."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def connect(
    dsn: str,
    *,
    timeout: float = 5.0,
    application_name: str | None = None,
    idle_session_seconds: float | None = None,
    wait_for_flush: bool = True,
) -> asyncpg.Connection:
    """One connection outside the pool (the relay's, the rebuild command's), with the
    services' session settings; ``idle_session_seconds``: the server ends the session
    once it has been idle that long (PostgreSQL 14 and later), which frees its session
    locks when the client froze. ``wait_for_flush=False``: its commits return before
    the WAL is on disk (``synchronous_commit=off``), for writes that a server crash may
    lose (the relay's checkpoint: what follows it is published again)."""
    settings = dict(SESSION_SETTINGS)
    if application_name:
        settings["application_name"] = application_name
    if idle_session_seconds is not None:
        settings["idle_session_timeout"] = str(int(idle_session_seconds * 1000))
    if not wait_for_flush:
        settings["synchronous_commit"] = "off"
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=timeout, server_settings=settings)
    try:
        await init_connection(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections have :func:`init_connection` applied (tests, commands)."""
    pool: asyncpg.Pool | None = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        timeout=5,
        server_settings=dict(SESSION_SETTINGS),
    )
    assert pool is not None
    return pool
