"""An asyncpg pool that a service can start before the database is up.

``Database.start()`` returns at once and keeps trying in the background; ``pool``
raises :class:`DatabaseUnavailable` until the first connection succeeded. asyncpg
replaces broken connections by itself afterwards (a restarted Postgres costs the
queries in flight, which callers retry).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog

from canvas_events.logging import redact

log = structlog.get_logger("canvas_events.postgres")


async def _no_session_reset(_: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's default reset (``pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL``: one more round trip per release). The services
    keep no session state on pooled connections: their advisory locks are per
    transaction, and LISTEN and session locks use connections of their own. asyncpg
    still rolls back a transaction left open."""


class DatabaseUnavailable(ConnectionError):
    """The pool is not up (yet)."""


class Database:
    """One pool for one service process, connected in the background."""

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        on_connect: Callable[[asyncpg.Pool], Awaitable[None]] | None = None,
        init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    ) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._on_connect = on_connect
        self._init = init
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.last_error: str | None = "not connected yet"

    async def start(self) -> None:
        """Start connecting in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._connect_forever(), name="database-connect")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the pool is up (and ``on_connect`` ran)."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool, once up."""
        if self._pool is None or not self._ready.is_set():
            raise DatabaseUnavailable(f"database not connected ({self.last_error})")
        return self._pool

    async def check(self, timeout: float = 2.0) -> str | None:
        """None when a ``SELECT 1`` answers within ``timeout``, else the reason."""
        try:
            pool = self.pool
            async with asyncio.timeout(timeout):
                await pool.fetchval("SELECT 1")
        except Exception as exc:
            return redact(f"database: {type(exc).__name__}: {exc}")
        return None

    async def _connect_forever(self) -> None:
        delay = 0.2
        while True:
            try:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    init=self._init,
                    reset=_no_session_reset,
                    timeout=5,
                    command_timeout=30,
                )
                assert pool is not None
                try:
                    if self._on_connect is not None:
                        await self._on_connect(pool)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
                self.last_error = None
                self._ready.set()
                log.info("database connected")
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = redact(f"{type(exc).__name__}: {exc}")
                log.warning("database unreachable; retrying", error=self.last_error, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def stop(self) -> None:
        """Stop connecting and close the pool."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)


async def ensure_database(dsn: str) -> None:
    """Create the database named in ``dsn`` when it does not exist (development, tests)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    conn: Any = await asyncpg.connect(admin, timeout=5)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
