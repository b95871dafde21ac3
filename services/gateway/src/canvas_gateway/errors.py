"""Errors raised inside the gateway; api.py turns each into its HTTP answer.

GatewayError
 └── StoreUnavailable (ConnectionError)   the database is away                 → 503
      └── StoreNotReady                   the orchestrator's tables do not exist → 503

canvas_store's own errors (CanvasTaken → 404, LimitReached → 429) come from there.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error raised by canvas_gateway."""


class StoreUnavailable(GatewayError, ConnectionError):
    """The database cannot be reached (not connected yet, restarted, pool exhausted)."""


class StoreNotReady(StoreUnavailable):
    """The job-orchestrator has not created its tables yet: nothing can be read."""
