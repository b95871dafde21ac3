"""Why an attempt failed, and whether another attempt may succeed.

Errors of this package::

    GeneratorError
     └── AttemptFailed (RuntimeError)          kind, retryable, message, retry_after_seconds
          ├── MissingApiKey (PermissionError)  no OPENAI_API_KEY: permanent
          └── BadOutput (ValueError)           the reply held no valid object: retryable

:func:`classify` turns whatever a call raised into an :class:`AttemptFailed`. The
``openai`` client's errors map like this (its own retries are off: the orchestrator
retries, docs/settings.md)::

    openai.OpenAIError
     ├── APIError
     │    ├── APIConnectionError               connection         retryable
     │    │    └── APITimeoutError             timeout            retryable (connection
     │    │                                    when a connection error lies under it)
     │    ├── APIResponseValidationError       bad_output         retryable
     │    ├── APIStatusError
     │    │    ├── BadRequestError 400         bad_request        permanent
     │    │    ├── AuthenticationError 401     invalid_api_key    permanent
     │    │    ├── PermissionDeniedError 403   permission_denied  permanent
     │    │    ├── NotFoundError 404           model_not_found    permanent
     │    │    ├── RateLimitError 429          rate_limited       retryable, Retry-After
     │    │    ├── InternalServerError 5xx     server_error       retryable
     │    │    └── any other status            408 timeout and 409 conflict retryable,
     │    │                                    the rest client_error permanent
     │    └── APIError itself                  server_error       retryable (an error
     │                                         event in the middle of a stream)
     └── anything else                         client_error       permanent
    TimeoutError                               timeout            retryable
    any other exception                        internal           retryable

A streamed reply can also break off after it began (:func:`broke_off`): a timeout or a
dropped connection midway keeps its kind and says how far the reply got, and a stream
that ends without a ``finish_reason`` is ``bad_output`` (see ``client.py``).

Messages end up in the job's ``error_message``: they say what to do in plain words and
never carry the API key (a 401's server text echoes part of it, so it is never used).
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Iterable
from datetime import UTC
from enum import StrEnum
from typing import Any

import aiohttp
import openai

from canvas_events.logging import redact

MISSING_API_KEY_MESSAGE = "OpenAI API key is required but not configured"
NO_VALID_OBJECT_MESSAGE = "model output had no valid object"

# A Retry-After beyond this is a server confusing us, not a plan.
_MAX_RETRY_AFTER_SECONDS = 3600.0
_SERVER_MESSAGE_LENGTH = 200
_KEY_LIKE = re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-*.]{4,}")


class FailureKind(StrEnum):
    """What went wrong in an attempt; the label of canvas_openai_errors_total."""

    MISSING_API_KEY = "missing_api_key"  # OPENAI_API_KEY not set: an operator must set it
    INVALID_API_KEY = "invalid_api_key"  # 401: the key is wrong or revoked
    PERMISSION_DENIED = "permission_denied"  # 403: the key may not use this model or region
    BAD_REQUEST = "bad_request"  # 400, or an empty query: the request itself is wrong
    MODEL_NOT_FOUND = "model_not_found"  # 404: OPENAI_MODEL does not exist on this server
    RATE_LIMITED = "rate_limited"  # 429: too many requests or tokens; wait Retry-After
    SERVER_ERROR = "server_error"  # 5xx: the provider had a problem
    TIMEOUT = "timeout"  # no answer within OPENAI_TIMEOUT_SECONDS
    CONNECTION = "connection"  # the server could not be reached
    CONFLICT = "conflict"  # 409: the provider's own lock timed out
    CLIENT_ERROR = "client_error"  # another 4xx, or the client refused to send
    BAD_OUTPUT = "bad_output"  # the reply was not JSON or held no valid object
    INTERNAL = "internal"  # a bug of ours; retried in case it was a fluke


class GeneratorError(Exception):
    """Root of every error raised by canvas_generator."""


class AttemptFailed(GeneratorError, RuntimeError):
    """An attempt ended without a drawing."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        retryable: bool,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.retry_after_seconds = retry_after_seconds

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind.value!r}, retryable={self.retryable}, "
            f"message={self.message!r})"
        )


class MissingApiKey(AttemptFailed, PermissionError):
    """No OPENAI_API_KEY: no attempt can succeed until an operator sets one."""

    def __init__(self) -> None:
        super().__init__(FailureKind.MISSING_API_KEY, MISSING_API_KEY_MESSAGE, retryable=False)


class BadOutput(AttemptFailed, ValueError):
    """The model answered, but not with a usable drawing; another try may do better."""

    def __init__(self, message: str = NO_VALID_OBJECT_MESSAGE) -> None:
        super().__init__(FailureKind.BAD_OUTPUT, message, retryable=True)


def classify(
    exc: BaseException,
    *,
    timeout_seconds: float | None = None,
    secrets: Iterable[str | None] = (),
) -> AttemptFailed:
    """The failure ``exc`` stands for; ``secrets`` are masked in any server text quoted."""
    if isinstance(exc, AttemptFailed):
        return exc
    hidden = [secret for secret in secrets if secret]
    lost = _connection_failure(exc)
    if lost is not None:
        return lost
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        within = f" within {timeout_seconds:g} s" if timeout_seconds else ""
        return AttemptFailed(
            FailureKind.TIMEOUT, f"OpenAI did not answer{within} (timeout)", retryable=True
        )
    if isinstance(exc, openai.APIConnectionError):
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
        return AttemptFailed(
            FailureKind.CONNECTION, f"could not connect to OpenAI ({cause})", retryable=True
        )
    if isinstance(exc, openai.APIResponseValidationError):
        return BadOutput("OpenAI's answer did not have the expected shape")
    if isinstance(exc, openai.APIStatusError):
        return _classify_status(exc, hidden)
    if isinstance(exc, openai.APIError):
        # The client raises APIError itself for an error event inside a stream: the
        # provider gave up midway, which another attempt may not.
        detail = _clean(exc.message, hidden)
        return AttemptFailed(
            FailureKind.SERVER_ERROR,
            f"OpenAI reported an error midway through its reply: {detail}",
            retryable=True,
        )
    if isinstance(exc, openai.OpenAIError):
        return AttemptFailed(
            FailureKind.CLIENT_ERROR,
            f"the OpenAI client refused the call: {_clean(str(exc), hidden)}",
            retryable=False,
        )
    return AttemptFailed(
        FailureKind.INTERNAL,
        f"generator error: {type(exc).__name__}: {_clean(str(exc), hidden)}",
        retryable=True,
    )


def lost_connection(cause: BaseException | None) -> bool:
    """Whether ``cause`` is one of aiohttp's connection errors other than a timeout (a
    refused connect, a connection closed or reset)."""
    return isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(
        cause, asyncio.TimeoutError
    )


def _connection_failure(exc: BaseException) -> AttemptFailed | None:
    """The failure of the connection under ``exc``, if one lies there. The aiohttp
    transport reports every aiohttp connection error as a ConnectTimeout (a refused
    connect, and a connection the server closed before it answered, as it closes one
    that was idle in the pool too long), which the client turns into an APITimeoutError:
    the cause tells what happened, and only a timeout is reported as one."""
    cause = exc.__cause__
    for _ in range(5):
        if cause is None:
            return None
        if lost_connection(cause):
            name = type(cause).__name__
            if isinstance(cause, aiohttp.ClientConnectorError):
                message = f"could not connect to OpenAI ({name})"
            elif isinstance(cause, aiohttp.ServerDisconnectedError):
                message = f"OpenAI closed the connection before it answered ({name})"
            else:
                message = f"the connection to OpenAI broke before it answered ({name})"
            return AttemptFailed(FailureKind.CONNECTION, message, retryable=True)
        cause = cause.__cause__
    return None


def broke_off(
    exc: BaseException,
    *,
    received_chars: int,
    timeout_seconds: float | None = None,
    secrets: Iterable[str | None] = (),
) -> AttemptFailed:
    """The failure of a streamed reply that broke off after ``received_chars`` characters
    of it had arrived: as :func:`classify` says, with the point it reached."""
    failure = classify(exc, timeout_seconds=timeout_seconds, secrets=secrets)
    if failure.kind is FailureKind.CONNECTION:
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
        message = f"the connection to OpenAI broke off midway through its reply ({cause})"
    elif failure.kind is FailureKind.TIMEOUT:
        within = f" within {timeout_seconds:g} s" if timeout_seconds else ""
        message = f"OpenAI did not finish its reply{within} (timeout)"
    else:
        return failure
    return AttemptFailed(
        failure.kind,
        f"{message}, after {received_chars} characters",
        retryable=failure.retryable,
        retry_after_seconds=failure.retry_after_seconds,
    )


def _classify_status(exc: openai.APIStatusError, hidden: list[str]) -> AttemptFailed:
    status = exc.status_code
    detail = _server_message(exc, hidden)
    suffix = f": {detail}" if detail else ""
    if status == 401:
        # OpenAI's 401 text quotes the key it got (partly masked): never pass it on.
        return AttemptFailed(
            FailureKind.INVALID_API_KEY, "OpenAI rejected the API key (401)", retryable=False
        )
    if status == 403:
        return AttemptFailed(
            FailureKind.PERMISSION_DENIED, f"OpenAI denied access (403){suffix}", retryable=False
        )
    if status == 400:
        return AttemptFailed(
            FailureKind.BAD_REQUEST, f"OpenAI rejected the request (400){suffix}", retryable=False
        )
    if status == 404:
        return AttemptFailed(
            FailureKind.MODEL_NOT_FOUND,
            f"OpenAI does not know the model (404){suffix}",
            retryable=False,
        )
    if status == 429:
        return AttemptFailed(
            FailureKind.RATE_LIMITED,
            f"OpenAI rate limit reached (429){suffix}",
            retryable=True,
            retry_after_seconds=retry_after(exc.response.headers),
        )
    if status >= 500:
        return AttemptFailed(
            FailureKind.SERVER_ERROR,
            f"OpenAI server error ({status})",
            retryable=True,
            retry_after_seconds=retry_after(exc.response.headers),
        )
    if status == 408:
        return AttemptFailed(
            FailureKind.TIMEOUT, "OpenAI timed out the request (408)", retryable=True
        )
    if status == 409:
        return AttemptFailed(FailureKind.CONFLICT, f"OpenAI conflict (409){suffix}", retryable=True)
    return AttemptFailed(
        FailureKind.CLIENT_ERROR, f"OpenAI refused the request ({status}){suffix}", retryable=False
    )


def _server_message(exc: openai.APIStatusError, hidden: list[str]) -> str:
    body: Any = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        return ""
    return _clean(message, hidden)


def _clean(text: str, hidden: list[str]) -> str:
    """Server or exception text fit for a job's error_message: one short line, no key."""
    for secret in hidden:
        text = text.replace(secret, "***")
    text = redact(_KEY_LIKE.sub("***", text))
    text = " ".join(text.split())
    if len(text) > _SERVER_MESSAGE_LENGTH:
        text = text[: _SERVER_MESSAGE_LENGTH - 1].rstrip() + "…"
    return text


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP
    date), or None when neither says anything usable."""
    try:
        millis = headers.get("retry-after-ms")
        if millis is not None:
            return _bounded(float(millis) / 1000)
    except (TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return _bounded(float(value))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" in an HTTP date means UTC without saying so
        when = when.replace(tzinfo=UTC)
    return _bounded(when.timestamp() - time.time())


def _bounded(seconds: float) -> float | None:
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_SECONDS)
