"""The gateway's REST API (docs/api.md) as the CLI uses it; errors become
:class:`~canvas_cli.errors.ApiError` or :class:`~canvas_cli.errors.Unreachable`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Self

import httpx

from canvas_cli.errors import ApiError, CliError, Unreachable

# Seconds for one request: every call answers at once, none waits for a job.
TIMEOUT: Final = 15.0
# The gateway's largest page.
MAX_PAGE: Final = 100

_HINTS: Final = {
    401: "check CANVAS_TOKEN or --token: it must be signed with the system's JWT_SECRET "
    "and not expired (canvas-jobs token --user NAME mints one)",
    403: "this needs a token with the admin role (canvas-jobs token --user NAME --admin)",
    404: "a job or canvas that is someone else's answers 404 too",
    429: "too many of your jobs are unfinished; wait for one to end",
    503: "the system cannot take this now; nothing was changed, try again",
}
# The 429 of the daily token budget (its detail starts so, and says when it resets).
_BUDGET_DETAIL: Final = "daily token budget used"
_BUDGET_HINT: Final = "your jobs used today's token budget; canvas-jobs usage shows it"


def error_detail(body: Any) -> str:
    """The server's ``detail`` in one line: a string as is, a 422's issues as
    ``field: message`` pairs."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        issues = []
        for issue in detail:
            if not isinstance(issue, dict):
                issues.append(str(issue))
                continue
            # loc is ["body", "canvas_id"] or ["query", "limit"]: the first says where.
            loc = [str(part) for part in issue.get("loc", [])[1:]]
            where = ".".join(loc) or "request"
            issues.append(f"{where}: {issue.get('msg', 'invalid')}")
        return "; ".join(issues) or "invalid request"
    return "no detail given"


def api_error(status: int, body: Any, retry_after: str | None = None) -> ApiError:
    """The error to show for an answer with ``status`` and JSON ``body``."""
    detail = error_detail(body)
    if status == 429 and detail.startswith(_BUDGET_DETAIL):
        # Retry-After is hours of seconds here: the detail's reset time says it better.
        return ApiError(status, detail, hint=_BUDGET_HINT, retry_after=retry_after)
    hint = _HINTS.get(status)
    if retry_after is not None and status in (429, 503):
        hint = f"{hint}; retry after {retry_after} s" if hint else f"retry after {retry_after} s"
    return ApiError(status, detail, hint=hint, retry_after=retry_after)


@dataclass(frozen=True)
class AdminFilter:
    """Which of every user's jobs an admin lists (each None: no filter)."""

    user_id: str | None = None
    # Text the job's prompt contains (case-insensitive).
    text: str | None = None
    since: datetime | None = None

    def params(self) -> dict[str, str]:
        """The filter as ``GET /api/admin/jobs`` parameters."""
        params = {"user_id": self.user_id, "q": self.text}
        if self.since is not None:
            params["since"] = self.since.isoformat()
        return {name: value for name, value in params.items() if value is not None}


class Gateway:
    """An open HTTP client for one gateway and one token; use ``async with``."""

    def __init__(
        self, base_url: str, token: str, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.base_url = base_url
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "canvas-jobs-cli"},
            timeout=TIMEOUT,
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        try:
            response = await self._client.request(
                method, path, json=json, params=params, headers=headers
            )
        except httpx.TimeoutException:
            raise Unreachable(
                f"the gateway at {self.base_url} did not answer within {TIMEOUT:g} s"
            ) from None
        except httpx.TransportError as exc:
            # The message names the host and the OS error; the token is in a header,
            # never in the URL, so it cannot appear here.
            raise Unreachable(
                f"cannot reach the gateway at {self.base_url}: {exc or type(exc).__name__}",
                hint="is it running? set CANVAS_GATEWAY_URL or --gateway-url",
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_error:
            raise api_error(response.status_code, body, response.headers.get("Retry-After"))
        if body is None:
            raise CliError(
                f"the gateway at {self.base_url} answered {response.status_code} "
                f"with no JSON to {method} {path}"
            )
        return body

    async def submit(
        self,
        query: str,
        *,
        canvas_id: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Create a job: the 202 answer (``job_id``, ``canvas_id``, ...)."""
        body: dict[str, Any] = {"query": query}
        if canvas_id is not None:
            body["canvas_id"] = canvas_id
        if priority is not None:
            body["priority"] = priority
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        result: dict[str, Any] = await self._call(
            "POST", "/api/ai-agent/create-canvas", json=body, headers=headers
        )
        return result

    async def status(self, job_id: str) -> dict[str, Any]:
        """The job's status answer."""
        result: dict[str, Any] = await self._call("GET", f"/api/ai-agent/job/{job_id}/status")
        return result

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's recorded events, in order (empty until the first is recorded)."""
        body = await self._call("GET", f"/api/ai-agent/job/{job_id}/events")
        events: list[dict[str, Any]] = body["events"]
        return events

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask for the job to be cancelled (202); 409 when it is already final."""
        result: dict[str, Any] = await self._call("POST", f"/api/ai-agent/job/{job_id}/cancel")
        return result

    async def retry(self, job_id: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Run a final job again: the 202 answer (``job_id``, ``retry_of``, ...)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        result: dict[str, Any] = await self._call(
            "POST", f"/api/ai-agent/job/{job_id}/retry", headers=headers
        )
        return result

    async def jobs_page(
        self,
        *,
        status: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        everyone: AdminFilter | None = None,
    ) -> dict[str, Any]:
        """One page of the caller's jobs (with ``everyone``, every user's that match it:
        admins only), newest first: ``jobs`` and ``next_cursor``."""
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = status
        if cursor is not None:
            params["cursor"] = cursor
        path = "/api/ai-agent/jobs"
        if everyone is not None:
            path = "/api/admin/jobs"
            params |= everyone.params()
        result: dict[str, Any] = await self._call("GET", path, params=params)
        return result

    async def jobs(
        self,
        *,
        status: str | None = None,
        limit: int | None = 20,
        page_size: int = MAX_PAGE,
        everyone: AdminFilter | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The caller's jobs (or, with ``everyone``, every user's that match it), newest
        first, following ``next_cursor`` until ``limit`` jobs came (None: all of them)."""
        cursor: str | None = None
        given = 0
        while limit is None or given < limit:
            size = page_size if limit is None else min(page_size, limit - given)
            page = await self.jobs_page(status=status, limit=size, cursor=cursor, everyone=everyone)
            for job in page["jobs"]:
                if limit is not None and given >= limit:
                    return
                yield job
                given += 1
            cursor = page.get("next_cursor")
            if cursor is None or not page["jobs"]:
                return

    async def usage(self) -> dict[str, Any]:
        """The caller's tokens today, daily budget (None: no limit) and reset time."""
        result: dict[str, Any] = await self._call("GET", "/api/ai-agent/usage")
        return result

    async def canvas_objects(self, canvas_id: str) -> list[dict[str, Any]]:
        """The objects on a canvas, in drawing order."""
        body = await self._call("GET", f"/api/canvas/{canvas_id}/objects")
        objects: list[dict[str, Any]] = body["objects"]
        return objects
