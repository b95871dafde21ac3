"""What can go wrong in ``canvas-jobs``, and the exit code each ends with.

Exit codes (also in the README)::

    0  success; for submit --watch and watch: the job completed
    1  the job failed
    2  the job was cancelled
    3  anything else: a usage error, no token, a refused or bad token (401), a job that
       is not there (404), a job already final (409), a rejected request (422), too
       many jobs or the day's token budget used (429), the system unavailable (503), a
       gateway or notifier that cannot be reached
    130  interrupted (Ctrl-C); the job goes on

Exceptions::

    CliError (Exception)           a message for the user and the exit code 3
    ├── ApiError                   the gateway answered an error: status and detail
    └── Unreachable (ConnectionError)  the gateway or notifier cannot be reached
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """How ``canvas-jobs`` ends; scripts branch on it."""

    OK = 0  # done; for a watched job: it completed
    FAILED = 1  # the watched job failed
    CANCELLED = 2  # the watched job was cancelled
    ERROR = 3  # usage, authentication, HTTP or connection error: the message says which
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


class CliError(Exception):
    """An error the user can act on: printed as ``canvas-jobs: error: <message>``."""

    exit_code = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ApiError(CliError):
    """The gateway answered with an error status."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        hint: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(f"{status}: {detail}", hint=hint)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class Unreachable(CliError, ConnectionError):
    """The gateway or the notifier does not answer."""
