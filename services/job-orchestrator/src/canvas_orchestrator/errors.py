"""Errors raised by canvas_orchestrator.

OrchestratorError
 ├── ConcurrencyError (RuntimeError)   another writer appended to the stream first:
 │                                     re-read the stream and decide again
 └── UnexpectedEvent (ValueError)      an event the orchestrator does not take from the
                                       bus (it records it only as its own decision)
"""


class OrchestratorError(Exception):
    """Root of every error raised by canvas_orchestrator."""


class ConcurrencyError(OrchestratorError, RuntimeError):
    """The stream's version moved on since it was read: the append changed nothing."""


class UnexpectedEvent(OrchestratorError, ValueError):
    """An incoming event that is no command for the orchestrator (e.g. a JobQueued)."""
