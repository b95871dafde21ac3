"""An asyncpg pool that a service can start before the database is up, and the one
answer to "is this error an outage?".

``Database.start()`` returns at once and keeps trying in the background; ``pool``
raises :class:`DatabaseUnavailable` until the first connection succeeded. asyncpg
replaces broken connections by itself afterwards (a restarted Postgres costs the
queries in flight, which callers retry).

:func:`is_outage` tells an error that says the database cannot work right now (gone,
restarting, read-only after a failover, out of disk, a statement or lock timeout) from
one that says something about the request or message at hand. Every caller asks it:
an outage is answered 503 by the gateway and retried without limit by consumers, never
dead-lettered; anything else is the request's fault (4xx) or a bounded retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
import structlog

from canvas_events.logging import redact
from canvas_events.runtime import cancel_and_wait

log = structlog.get_logger("canvas_events.postgres")


# Namespace of the two-key advisory lock on a job that has no jobs row yet (the key's
# second part: hashtext of the job id as text). The orchestrator holds it while it
# records the job, the gateway while it requests the job's cancel: whichever comes
# second sees what the first wrote (a cancel answered 202 always wins: docs/api.md, the
# cancel route).
JOB_RECORDING_LOCK_CLASS: Final = 0x63610003

# Session settings of every service connection. A process that freezes (SIGSTOP, a
# paused VM, a partition) must not hold what others wait for: a transaction it left open
# (its row locks; the event store's readers stop below it) ends after
# IDLE_IN_TRANSACTION_SECONDS, and TCP keepalives tell a vanished peer from an idle one
# within about 20 s. No service transaction waits on its client for more than a moment.
IDLE_IN_TRANSACTION_SECONDS: Final = 15
SESSION_SETTINGS: Final = {
    "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_SECONDS * 1000),
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "3",
    "tcp_keepalives_count": "3",
}


async def _no_session_reset(_: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's default reset (``pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL``: one more round trip per release). The services
    keep no session state on pooled connections: their advisory locks are per
    transaction, and LISTEN and session locks use connections of their own. asyncpg
    still rolls back a transaction left open."""


class DatabaseUnavailable(ConnectionError):
    """The pool is not up (yet)."""


# SQLSTATE classes that say the server cannot work now, whatever the statement:
# 08 connection exception, 53 insufficient resources (disk full, out of memory, too many
# connections), 57 operator intervention (shutdown, restart, statement timeout, database
# dropped), 58 system error (I/O).
_OUTAGE_CLASSES: Final = frozenset({"08", "53", "57", "58"})
# And single states: read-only transaction (a failover's old primary, a standby), idle
# in transaction session timeout, lock timeout.
_OUTAGE_STATES: Final = frozenset({"25006", "25P03", "55P03"})
# OSErrors about files say nothing about the database's reachability.
_FILE_ERRORS: Final = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says that the database (or the network to it) cannot work right
    now, as opposed to something about the statement or its values."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in _OUTAGE_CLASSES or state in _OUTAGE_STATES
    if isinstance(exc, asyncpg.InternalClientError):
        # A connection left mid-operation by a query cut off ("cannot switch to state
        # ...; another operation is in progress"): that connection is done for, the
        # next one is fine.
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed", "pool is closing": the connection went under us. Other
        # interface errors (a value it cannot encode) come back on every try.
        message = str(exc)
        return not isinstance(exc, ValueError) and ("closed" in message or "closing" in message)
    if isinstance(exc, TimeoutError | ConnectionError | socket.gaierror):
        return True
    # asyncpg reports a failed connect as a bare OSError ("Multiple exceptions: ...").
    return isinstance(exc, OSError) and not isinstance(exc, _FILE_ERRORS)


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
                    server_settings=dict(SESSION_SETTINGS),
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
            await cancel_and_wait(self._task)
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
