"""The operators' view: every user's jobs, filtered, and any job's events (admins
only; anyone else gets 403)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from canvas_gateway.deps import AdminUser, StoreDep
from canvas_gateway.routes import error_responses
from canvas_gateway.routes.jobs import (
    PageCursor,
    PageSize,
    StatusFilter,
    decode_cursor,
    next_cursor,
)
from canvas_gateway.schemas import (
    AdminJobsPublic,
    JobAdminPublic,
    JobEventPublic,
    JobEventsPublic,
    Storable,
)
from canvas_gateway.store import JobFilter

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.get(
    "/jobs",
    summary="Every user's jobs, newest first",
    description="Each job is shaped like the status answer, with its `user_id`. Filters "
    "combine: status, user, created since a time, and text the query contains "
    "(case-insensitive, taken literally).",
    responses=error_responses(401, 403, 422, 503),
)
async def all_jobs(
    _admin: AdminUser,
    store: StoreDep,
    status_: StatusFilter = None,
    user_id: Annotated[
        Storable | None,
        Query(min_length=1, max_length=200, description="Only this user's jobs."),
    ] = None,
    since: Annotated[
        datetime | None,
        Query(description="Only jobs created at or after this ISO 8601 time (with a zone)."),
    ] = None,
    q: Annotated[
        Storable | None,
        Query(min_length=1, max_length=200, description="Only jobs whose query contains this."),
    ] = None,
    limit: PageSize = 20,
    cursor: PageCursor = None,
) -> AdminJobsPublic:
    if since is not None and since.tzinfo is None:
        issue = {
            "loc": ("query", "since"),
            "msg": "must carry a time zone (e.g. 2026-01-01T00:00:00Z)",
            "type": "value_error",
        }
        raise RequestValidationError([issue])
    where = JobFilter(status=status_, user_id=user_id, since=since, text=q)
    after = decode_cursor(cursor) if cursor is not None else None
    rows = await store.all_jobs(where, after=after, limit=limit)
    return AdminJobsPublic(
        jobs=[JobAdminPublic.model_validate(row) for row in rows],
        next_cursor=next_cursor(rows, limit),
    )


@router.get(
    "/jobs/{job_id}/events",
    summary="Any job's event stream",
    description="Every recorded event of any user's job, in order.",
    responses=error_responses(401, 403, 404, 422, 503),
)
async def job_events(job_id: UUID, _admin: AdminUser, store: StoreDep) -> JobEventsPublic:
    events = await store.events(None, job_id)
    if events is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="job not found")
    return JobEventsPublic(
        job_id=job_id, events=[JobEventPublic.model_validate(event) for event in events]
    )
