"""The REST endpoints, one module per resource, and what their errors look like in
the OpenAPI document."""

from __future__ import annotations

from typing import Any

from canvas_gateway.schemas import ErrorPublic, ValidationErrorPublic

_ERRORS: dict[int, tuple[type[Any], str]] = {
    401: (ErrorPublic, "No valid bearer token (missing, malformed, badly signed or expired)."),
    403: (ErrorPublic, "The token lacks the admin role."),
    404: (ErrorPublic, "No such resource, or it belongs to another user."),
    409: (
        ErrorPublic,
        "The job's state forbids it: already final (cancel), not final yet (retry).",
    ),
    413: (ErrorPublic, "The request body is over `MAX_REQUEST_BYTES`; it was not read."),
    422: (ValidationErrorPublic, "The request is malformed; `detail` lists every problem."),
    429: (
        ErrorPublic,
        "Too many unfinished jobs, or the daily token budget is used (`detail` says which); "
        "retry after `Retry-After` seconds.",
    ),
    503: (
        ErrorPublic,
        "The database or the broker is unavailable; nothing was changed. Retry after "
        "`Retry-After` seconds.",
    ),
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entry for each error status code."""
    return {code: {"model": _ERRORS[code][0], "description": _ERRORS[code][1]} for code in codes}
