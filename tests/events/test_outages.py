"""Which errors are an outage (wait and retry without limit) and which say something
about the message or request at hand (bounded retries, dead letter, 4xx)."""

from __future__ import annotations

import asyncpg
import pytest

from canvas_events.broker import is_transient
from canvas_events.errors import PoisonMessage, PublishError
from canvas_events.postgres import DatabaseUnavailable, is_outage


@pytest.mark.parametrize(
    "error",
    [
        DatabaseUnavailable("not connected yet"),
        ConnectionResetError("reset by peer"),
        TimeoutError(),
        OSError("Multiple exceptions: [Errno 111] Connect call failed"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.DiskFullError("could not extend file: No space left on device"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.IdleInTransactionSessionTimeoutError("terminating connection due to idle"),
        asyncpg.LockNotAvailableError("canceling statement due to lock timeout"),
        asyncpg.InterfaceError("cannot perform operation: connection is closed"),
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
    ],
)
def test_errors_that_say_the_database_cannot_work_now_are_outages(error: BaseException) -> None:
    assert is_outage(error)
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.UntranslatableCharacterError('unsupported Unicode escape sequence "\\u0000"'),
        asyncpg.UniqueViolationError("duplicate key value violates unique constraint"),
        asyncpg.UndefinedColumnError('column "nope" does not exist'),
        asyncpg.InterfaceError("invalid input for query argument $1"),
        asyncpg.exceptions._base.DataError("invalid input for query argument $2"),
        FileNotFoundError("migrations/0004.sql"),
        ValueError("a bug"),
        PoisonMessage("not JSON"),
    ],
)
def test_errors_about_the_statement_or_the_message_are_not_outages(error: BaseException) -> None:
    assert not is_outage(error)
    assert not is_transient(error)


def test_a_broker_that_did_not_confirm_is_transient() -> None:
    assert is_transient(PublishError("broker not connected"))
