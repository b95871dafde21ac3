"""Errors raised by canvas_events.

CanvasEventsError
 ├── ConfigError (ValueError)            a setting has a bad value; names the variable
 ├── PoisonMessage (ValueError)          a message that can never be handled: dead-letter it
 │    └── UnknownEventType               a type this build does not know
 ├── PublishError (ConnectionError)      the broker did not confirm a message
 └── AuthError (PermissionError)         a missing, malformed or expired token
"""


class CanvasEventsError(Exception):
    """Root of every error raised by canvas_events."""


class ConfigError(CanvasEventsError, ValueError):
    """A setting read from the environment has a bad value."""


class PoisonMessage(CanvasEventsError, ValueError):
    """A message that no retry can fix (not JSON, unknown type, wrong schema, missing fields)."""


class UnknownEventType(PoisonMessage):
    """A message whose ``type`` this build does not know."""


class PublishError(CanvasEventsError, ConnectionError):
    """The broker did not confirm a message: it may not be queued."""


class AuthError(CanvasEventsError, PermissionError):
    """A bearer token is missing, malformed, badly signed or expired."""
