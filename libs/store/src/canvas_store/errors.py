"""Errors raised by canvas_store.

StoreError
 ├── ConcurrencyError (RuntimeError)   another writer appended to the stream, or recorded
 │                                     the job, first: read again and decide again
 ├── CanvasTaken (LookupError)         the canvas is another user's
 ├── LimitReached                      the user already has too many unfinished jobs
 └── BudgetSpent                       the user's jobs used their daily token budget

An outage of the database itself is not a StoreError: asyncpg's and the socket's errors
pass through, and ``canvas_events.postgres.is_outage`` tells them apart.
"""

from __future__ import annotations

from datetime import datetime


class StoreError(Exception):
    """Root of every error raised by canvas_store."""


class ConcurrencyError(StoreError, RuntimeError):
    """A stream's version moved on since it was read: the append changed nothing."""


class CanvasTaken(StoreError, LookupError):
    """The canvas belongs to another user (answered exactly like a missing one)."""


class LimitReached(StoreError):
    """The user already has ``active`` unfinished jobs, at or over ``limit``."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} unfinished jobs, limit {limit}")
        self.active = active
        self.limit = limit


class BudgetSpent(StoreError):
    """The user's jobs completed today used ``used`` tokens, at or over ``budget``; the
    budget starts again at ``resets_at``."""

    def __init__(self, used: int, budget: int, resets_at: datetime) -> None:
        super().__init__(f"{used} tokens used today, budget {budget}")
        self.used = used
        self.budget = budget
        self.resets_at = resets_at
