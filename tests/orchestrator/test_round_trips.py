"""How many round trips to PostgreSQL one of the orchestrator's transactions takes, idle
(services/job-orchestrator/README.md, "Group commit", says the figures): every
statement the transaction's connection sends is counted, BEGIN and COMMIT included, on
the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from canvas_orchestrator.handlers import Handler
from tests.orchestrator.harness import wait_status
from tests.orchestrator.test_flow import dispatched_job, started

# What a statement goes through: each call is one round trip.
_SENDING = ("execute", "executemany", "fetch", "fetchrow", "fetchval")

# The statements of the transaction being recorded, in the task that records it.
_counting: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "_counting", default=None
)


def _counted(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def send(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        statements = _counting.get()
        if statements is not None:
            statements.append(" ".join(str(query).split())[:60])
        return await method(self, query, *args, **kwargs)

    return send


@pytest.fixture
def transactions(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The statements of each transaction the orchestrator records, in order."""
    recorded: list[list[str]] = []
    for name in _SENDING:
        monkeypatch.setattr(asyncpg.Connection, name, _counted(getattr(asyncpg.Connection, name)))
    original = Handler._record

    async def record(self: Handler, *args: Any, **kwargs: Any) -> Any:
        statements: list[str] = []
        recorded.append(statements)
        token = _counting.set(statements)
        try:
            return await original(self, *args, **kwargs)
        finally:
            _counting.reset(token)

    monkeypatch.setattr(Handler, "_record", record)
    return recorded


async def test_a_new_job_takes_8_round_trips_and_its_start_5(start, bus, transactions) -> None:
    service = await start()
    _, job_id, requested = await dispatched_job(bus)
    new_job = transactions[-1]
    await bus.reply(requested, started(requested))
    await wait_status(service, job_id, "processing")
    start_of_attempt = transactions[-1]

    assert len(transactions) == 2, transactions
    assert new_job[0].startswith("BEGIN") and new_job[-1].startswith("COMMIT"), new_job
    assert len(new_job) == 8, new_job
    assert len(start_of_attempt) == 5, start_of_attempt
