"""Errors raised by canvas_orchestrator (a stream that moved meanwhile is
canvas_store.errors.ConcurrencyError).

OrchestratorError
 └── UnexpectedEvent (ValueError)      an event the orchestrator does not take from the
                                       bus (it records it only as its own decision)
"""


class OrchestratorError(Exception):
    """Root of every error raised by canvas_orchestrator."""


class UnexpectedEvent(OrchestratorError, ValueError):
    """An incoming event that is no command for the orchestrator (e.g. a JobQueued)."""
