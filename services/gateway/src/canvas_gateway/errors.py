"""Errors raised inside the gateway; api.py turns each into its HTTP answer.

GatewayError
 ├── StoreUnavailable (ConnectionError)   the database is away                 → 503
 │    └── StoreNotReady                   the orchestrator's tables do not exist → 503
 ├── CanvasNotFound (LookupError)         someone else's canvas, shown as missing → 404
 └── LimitReached                         the user has too many unfinished jobs   → 429
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error raised by canvas_gateway."""


class StoreUnavailable(GatewayError, ConnectionError):
    """The database cannot be reached (not connected yet, restarted, pool exhausted)."""


class StoreNotReady(StoreUnavailable):
    """The job-orchestrator has not created its tables yet: nothing can be read."""


class CanvasNotFound(GatewayError, LookupError):
    """The canvas belongs to another user; answered exactly like a missing one."""


class LimitReached(GatewayError):
    """The user already has ``active`` unfinished jobs, at or over ``limit``."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} unfinished jobs, limit {limit}")
        self.active = active
        self.limit = limit
