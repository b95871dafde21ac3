from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import httpx2
import openai
import pytest
from aiohttp.client_reqrep import ConnectionKey
from openai._vendor.httpx_aiohttp.transport import map_aiohttp_exceptions

from canvas_generator.errors import (
    MISSING_API_KEY_MESSAGE,
    AttemptFailed,
    FailureKind,
    MissingApiKey,
    broke_off,
    classify,
    retry_after,
)

KEY = "sk-proj-secret0123456789abcdef"
REQUEST = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")


def status_error(cls, status, message="", headers=None):
    response = httpx2.Response(status, headers=headers or {}, request=REQUEST)
    body = {"message": message, "type": "x", "param": None, "code": None}
    return cls(f"Error code: {status} - {body}", response=response, body=body)


def test_authentication_error_is_permanent_and_never_quotes_the_server():
    exc = status_error(openai.AuthenticationError, 401, f"Incorrect API key provided: {KEY}")
    failure = classify(exc, secrets=[KEY])
    assert (failure.kind, failure.retryable) == (FailureKind.INVALID_API_KEY, False)
    assert failure.message == "OpenAI rejected the API key (401)"


@pytest.mark.parametrize(
    ("cls", "status", "kind"),
    [
        (openai.BadRequestError, 400, FailureKind.BAD_REQUEST),
        (openai.PermissionDeniedError, 403, FailureKind.PERMISSION_DENIED),
        (openai.NotFoundError, 404, FailureKind.MODEL_NOT_FOUND),
        (openai.UnprocessableEntityError, 422, FailureKind.CLIENT_ERROR),
    ],
)
def test_client_errors_are_permanent_and_say_the_server_message(cls, status, kind):
    failure = classify(status_error(cls, status, "The model `gpt-9` does not exist"))
    assert (failure.kind, failure.retryable) == (kind, False)
    assert f"({status})" in failure.message
    assert "The model `gpt-9` does not exist" in failure.message


def test_server_message_is_shortened_and_any_key_in_it_masked():
    exc = status_error(openai.BadRequestError, 400, f"bad key {KEY} " + "x" * 500)
    failure = classify(exc, secrets=[KEY])
    assert KEY not in failure.message
    assert "sk-proj" not in failure.message
    assert len(failure.message) < 300


def test_key_shaped_text_is_masked_even_when_not_given_as_a_secret():
    failure = classify(status_error(openai.BadRequestError, 400, "key sk-abcdefghijklmnop bad"))
    assert "sk-abcdefghijklmnop" not in failure.message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({}, None),
        ({"retry-after": "soon"}, None),
    ],
)
def test_rate_limit_is_retryable_with_retry_after(headers, expected):
    failure = classify(status_error(openai.RateLimitError, 429, "slow down", headers))
    assert (failure.kind, failure.retryable) == (FailureKind.RATE_LIMITED, True)
    assert failure.retry_after_seconds == expected


def test_retry_after_reads_an_http_date():
    when = datetime.now(UTC) + timedelta(seconds=30)
    seconds = retry_after({"retry-after": format_datetime(when, usegmt=True)})
    assert seconds is not None
    assert 20 < seconds <= 30


def test_retry_after_is_bounded():
    assert retry_after({"retry-after": "99999999"}) == 3600.0
    assert retry_after({"retry-after": "-5"}) == 0.0


@pytest.mark.parametrize("status", [500, 502, 503, 529])
def test_server_errors_are_retryable(status):
    failure = classify(status_error(openai.InternalServerError, status))
    assert (failure.kind, failure.retryable) == (FailureKind.SERVER_ERROR, True)
    assert str(status) in failure.message


def test_timeout_is_retryable():
    failure = classify(openai.APITimeoutError(request=REQUEST), timeout_seconds=60)
    assert (failure.kind, failure.retryable) == (FailureKind.TIMEOUT, True)
    assert "60 s" in failure.message


def test_connection_error_is_retryable():
    exc = openai.APIConnectionError(request=REQUEST)
    exc.__cause__ = ConnectionRefusedError()
    failure = classify(exc)
    assert (failure.kind, failure.retryable) == (FailureKind.CONNECTION, True)
    assert "ConnectionRefusedError" in failure.message


def _sent_through_aiohttp(error: Exception) -> openai.APIError:
    """``error`` as the openai client raises it from its aiohttp transport: mapped to an
    httpx2 error (any connection error to a ConnectTimeout), then to its own."""
    try:
        try:
            with map_aiohttp_exceptions():
                raise error
        except httpx2.TimeoutException as mapped:
            raise openai.APITimeoutError(request=REQUEST) from mapped
    except openai.APIError as exc:
        return exc
    raise AssertionError("not raised")


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (
            aiohttp.ServerDisconnectedError(),
            FailureKind.CONNECTION,
            "OpenAI closed the connection before it answered (ServerDisconnectedError)",
        ),
        (
            aiohttp.ClientOSError(104, "Connection reset by peer"),
            FailureKind.CONNECTION,
            "the connection to OpenAI broke before it answered (ClientOSError)",
        ),
        (
            aiohttp.ClientConnectorError(
                ConnectionKey("h", 1, False, True, None, None, None), ConnectionRefusedError()
            ),
            FailureKind.CONNECTION,
            "could not connect to OpenAI (ClientConnectorError)",
        ),
        (
            aiohttp.ConnectionTimeoutError(),
            FailureKind.TIMEOUT,
            "OpenAI did not answer within 60 s (timeout)",
        ),
    ],
)
def test_only_a_timeout_under_the_clients_timeout_error_is_a_timeout(error, kind, message):
    failure = classify(_sent_through_aiohttp(error), timeout_seconds=60)
    assert (failure.kind, failure.retryable, failure.message) == (kind, True, message)


def test_missing_api_key_is_permanent_with_the_exact_message():
    failure = classify(MissingApiKey())
    assert (failure.kind, failure.retryable) == (FailureKind.MISSING_API_KEY, False)
    assert failure.message == MISSING_API_KEY_MESSAGE
    assert MISSING_API_KEY_MESSAGE == "OpenAI API key is required but not configured"


def test_unexpected_exception_is_an_internal_retryable_failure():
    failure = classify(KeyError("choices"))
    assert (failure.kind, failure.retryable) == (FailureKind.INTERNAL, True)
    assert "KeyError" in failure.message


def test_errors_are_also_builtin_exceptions():
    assert isinstance(MissingApiKey(), PermissionError)
    assert isinstance(MissingApiKey(), AttemptFailed)
    assert isinstance(classify(KeyError()), RuntimeError)


def test_error_event_in_a_stream_is_a_retryable_server_error_without_the_key():
    exc = openai.APIError(f"overloaded, key {KEY}", REQUEST, body=None)
    failure = classify(exc, secrets=[KEY])
    assert (failure.kind, failure.retryable) == (FailureKind.SERVER_ERROR, True)
    assert "midway" in failure.message
    assert KEY not in failure.message


def test_stream_broken_off_midway_keeps_its_kind_and_says_how_far_it_got():
    try:
        raise openai.APIConnectionError(request=REQUEST) from httpx2.RemoteProtocolError("peer")
    except openai.APIConnectionError as exc:
        lost = broke_off(exc, received_chars=321)
    assert (lost.kind, lost.retryable) == (FailureKind.CONNECTION, True)
    assert "midway" in lost.message and "321 characters" in lost.message
    assert "RemoteProtocolError" in lost.message

    slow = broke_off(openai.APITimeoutError(request=REQUEST), received_chars=5, timeout_seconds=30)
    assert (slow.kind, slow.retryable) == (FailureKind.TIMEOUT, True)
    assert "within 30 s" in slow.message

    refused = broke_off(status_error(openai.BadRequestError, 400, "no"), received_chars=0)
    assert (refused.kind, refused.retryable) == (FailureKind.BAD_REQUEST, False)
