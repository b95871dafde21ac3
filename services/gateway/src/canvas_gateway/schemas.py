"""Request and response bodies of the REST API (docs/api.md), with the examples
that /docs shows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from canvas_events.events import MAX_QUERY_LENGTH
from canvas_store.status import ACTIVE_STATUSES, FINAL_STATUSES, JobStatus

__all__ = ["ACTIVE_STATUSES", "FINAL_STATUSES", "JobStatus"]  # part of this module's API

CANVAS_ID_PATTERN = r"^[A-Za-z0-9_\-.:]{1,128}$"
# Printable ASCII: the key is echoed into logs and hashed into the job id.
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,200}$"
# Options travel inside every GenerationRequested message: keep them small.
MAX_OPTIONS_BYTES = 4_096

_JOB_ID = "3f1c9a52-8d7e-4b1a-9c33-2f5d6e7a8b90"
_CANVAS_ID = "team-board-42"


def examples(*shown: dict[str, Any], extra: Literal["forbid"] | None = None) -> ConfigDict:
    """A model's config whose OpenAPI schema shows ``shown`` as its examples."""
    config = ConfigDict(json_schema_extra={"examples": list(shown)})
    if extra is not None:
        config["extra"] = extra
    return config


def storable(text: str) -> str:
    """``text`` when the store can hold it: PostgreSQL's text and jsonb refuse NUL, and
    UTF-8 (every wire on the way) has no lone surrogates. Else a ValueError (a 422)."""
    if "\x00" in text:
        raise ValueError("must not contain NUL (\\u0000) characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must not contain lone surrogates (\\ud800-\\udfff)") from None
    return text


# Text a request hands to the store (a filter, a name): 422 for what it cannot hold.
Storable = Annotated[str, AfterValidator(storable)]


def _storable_json(value: Any) -> None:
    """Raise ValueError for a string anywhere in ``value`` the store cannot hold."""
    if isinstance(value, str):
        storable(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            storable(key)
            _storable_json(item)
    elif isinstance(value, list):
        for item in value:
            _storable_json(item)


class JobCreate(BaseModel):
    """What to draw, and where."""

    model_config = examples(
        {"query": "a flowchart of a login process"},
        {
            "query": "a kanban board with three columns",
            "canvas_id": _CANVAS_ID,
            "priority": 7,
            "options": {"style": "minimal"},
        },
        extra="forbid",
    )

    query: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_LENGTH),
        AfterValidator(storable),
    ] = Field(description="What to draw, in plain words (surrounding blanks are stripped; no NUL).")
    canvas_id: Annotated[str, Field(pattern=CANVAS_ID_PATTERN)] | None = Field(
        default=None,
        description="The canvas to draw on; a new one when omitted. Letters, digits, `_-.:`.",
    )
    priority: Annotated[int, Field(ge=0, le=9, strict=True)] = Field(
        default=5, description="0..9, higher first."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Passed to the generator; at most {MAX_OPTIONS_BYTES} bytes as JSON, "
        "no NUL in any string, numbers within 64 bits.",
    )

    @field_validator("options")
    @classmethod
    def _small_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        _storable_json(value)
        try:
            size = len(orjson.dumps(value))
        except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits
            raise ValueError("options must hold numbers within 64 bits") from None
        if size > MAX_OPTIONS_BYTES:
            raise ValueError(
                f"options must be at most {MAX_OPTIONS_BYTES} bytes as JSON, not {size}"
            )
        return value


class JobAccepted(BaseModel):
    """The broker confirmed the request: the job exists and waits for a generator."""

    model_config = examples(
        {
            "job_id": _JOB_ID,
            "status": "queued",
            "canvas_id": _CANVAS_ID,
            "status_url": f"/api/ai-agent/job/{_JOB_ID}/status",
            "events_url": f"/api/ai-agent/job/{_JOB_ID}/events",
        }
    )

    job_id: UUID
    status: Literal["queued"] = "queued"
    canvas_id: str
    status_url: str
    events_url: str


class RetryAccepted(JobAccepted):
    """The final job runs again, as a new job with the same query, canvas, priority and
    options."""

    model_config = examples(
        {
            "job_id": _JOB_ID,
            "status": "queued",
            "canvas_id": _CANVAS_ID,
            "status_url": f"/api/ai-agent/job/{_JOB_ID}/status",
            "events_url": f"/api/ai-agent/job/{_JOB_ID}/events",
            "retry_of": "8e2b7c14-0a6d-4f3e-b1c9-7d5a3e2f1c08",
        }
    )

    retry_of: UUID = Field(description="The job this one runs again.")


class JobPublic(BaseModel):
    """One job as its read model shows it."""

    model_config = examples(
        {
            "id": _JOB_ID,
            "status": "completed",
            "query": "a flowchart of a login process",
            "canvas_id": _CANVAS_ID,
            "priority": 5,
            "created_at": "2025-01-01T12:00:00Z",
            "started_at": "2025-01-01T12:00:01Z",
            "completed_at": "2025-01-01T12:00:04Z",
            "error_message": None,
            "retry_count": 0,
            "next_attempt_at": None,
            "result": {
                "object_count": 2,
                "object_ids": ["5d0c...", "9a1e..."],
                "dropped_objects": 0,
                "model": "gpt-4o-mini",
                "usage": {"prompt_tokens": 120, "completion_tokens": 80},
                "latency_ms": 2900,
            },
            "retry_of": None,
            "waiting_for": None,
        }
    )

    id: UUID
    status: JobStatus
    query: str = Field(description="What the job draws, as submitted.")
    canvas_id: str
    priority: int
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error_message: str | None = None
    retry_count: int = Field(
        default=0, description="Retries scheduled so far (0 on the first attempt)."
    )
    next_attempt_at: datetime | None = None
    result: dict[str, Any] | None = Field(
        default=None,
        description="Of a completed job: object_count, object_ids, dropped_objects, model, "
        "usage, latency_ms.",
    )
    retry_of: UUID | None = Field(
        default=None, description="The job this one runs again (POST .../retry); else null."
    )
    waiting_for: str | None = Field(
        default=None,
        description="Why a queued job waits, when it is not simply its turn: `model "
        "capacity` while the fleet's model budget holds its call; else null.",
    )


class JobsPublic(BaseModel):
    """A page of the caller's jobs, newest first."""

    jobs: list[JobPublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class JobAdminPublic(JobPublic):
    """Any user's job, as an operator sees it: the status answer and whose it is."""

    user_id: str


class AdminJobsPublic(BaseModel):
    """A page of every user's jobs, newest first."""

    jobs: list[JobAdminPublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class JobEventPublic(BaseModel):
    """One recorded event of a job's stream."""

    type: str
    version: int = Field(description="1, 2, 3… within the job's stream.")
    position: int = Field(description="Global position in the event store, increasing.")
    occurred_at: datetime
    data: dict[str, Any]


class JobEventsPublic(BaseModel):
    """A job's whole stream, in order."""

    model_config = examples(
        {
            "job_id": _JOB_ID,
            "events": [
                {
                    "type": "JobRequested",
                    "version": 1,
                    "position": 101,
                    "occurred_at": "2025-01-01T12:00:00Z",
                    "data": {"query": "a flowchart", "canvas_id": _CANVAS_ID},
                },
                {
                    "type": "JobQueued",
                    "version": 2,
                    "position": 102,
                    "occurred_at": "2025-01-01T12:00:00Z",
                    "data": {"priority": 5, "retry_count": 0},
                },
            ],
        }
    )

    job_id: UUID
    events: list[JobEventPublic]


class CancelAccepted(BaseModel):
    """The cancellation is on its way; the job ends ``cancelled``."""

    model_config = examples({"job_id": _JOB_ID, "status": "cancelling"})

    job_id: UUID
    status: Literal["cancelling"] = "cancelling"


class CanvasObjectsPublic(BaseModel):
    """The objects that completed jobs put on a canvas, oldest first."""

    model_config = examples(
        {
            "canvas_id": _CANVAS_ID,
            "objects": [
                {
                    "id": "5d0c2f9e-...",
                    "job_id": _JOB_ID,
                    "type": "rectangle",
                    "x": 100,
                    "y": 80,
                    "width": 200,
                    "height": 60,
                    "text": "Login",
                }
            ],
        }
    )

    canvas_id: str
    objects: list[dict[str, Any]]


class JobProcessor(BaseModel):
    """Whether anything takes the work off the queues, and how long work waits. A null
    is a figure that could not be read (the broker or the database is away)."""

    work_queue: str
    queued_messages: int | None = Field(description="Attempts ready in the work queue.")
    generator_consumers: int | None
    orchestrator_consumers: int | None
    oldest_queued_age_seconds: float | None = Field(
        default=None,
        description="How long the longest-waiting queued job has waited; null when none is.",
    )
    outbox_lag: int | None = Field(
        default=None, description="Events recorded but not yet published by the relay."
    )
    oldest_unpublished_age_seconds: float | None = Field(
        default=None,
        description="How long the oldest of those has waited; null when the relay is caught up.",
    )


class HealthPublic(BaseModel):
    """The system as the gateway sees it."""

    model_config = examples(
        {
            "status": "healthy",
            "database": "ok",
            "broker": "ok",
            "job_processor": {
                "work_queue": "canvas.ai-generator.work",
                "queued_messages": 0,
                "generator_consumers": 2,
                "orchestrator_consumers": 1,
                "oldest_queued_age_seconds": 0.4,
                "outbox_lag": 0,
                "oldest_unpublished_age_seconds": None,
            },
            "issues": [],
        },
        {
            "status": "degraded",
            "database": "ok",
            "broker": "ok",
            "job_processor": {
                "work_queue": "canvas.ai-generator.work",
                "queued_messages": 12,
                "generator_consumers": 0,
                "orchestrator_consumers": 1,
                "oldest_queued_age_seconds": 75.2,
                "outbox_lag": 0,
                "oldest_unpublished_age_seconds": None,
            },
            "issues": [
                "no generator consumes the work queue",
                "the oldest queued job has waited 75 s (threshold 60 s)",
            ],
        },
    )

    status: Literal["healthy", "degraded", "unhealthy"] = Field(
        description="`unhealthy` (503): the database or the broker is away. `degraded` "
        "(200): jobs are accepted but may wait; `issues` says why."
    )
    database: str
    broker: str
    job_processor: JobProcessor
    issues: list[str] = Field(description="Every reason for a status other than healthy.")


class UsagePublic(BaseModel):
    """The caller's model tokens of the current UTC day, against their daily budget."""

    model_config = examples(
        {"tokens_used_today": 1234, "daily_budget": 10000, "resets_at": "2025-01-02T00:00:00Z"},
        {"tokens_used_today": 1234, "daily_budget": None, "resets_at": "2025-01-02T00:00:00Z"},
    )

    tokens_used_today: int = Field(
        ge=0, description="Tokens of the caller's jobs completed since 00:00 UTC."
    )
    daily_budget: int | None = Field(
        description="USER_DAILY_TOKEN_BUDGET; null when the caller has no limit (unset, "
        "or the caller is an admin)."
    )
    resets_at: datetime = Field(description="The next 00:00 UTC, when the count starts again.")


class ErrorPublic(BaseModel):
    """Every error answer."""

    detail: str


class ValidationIssue(BaseModel):
    """One thing wrong with a request."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorPublic(BaseModel):
    """A 422: every problem found, where, and why; the offending values are not echoed."""

    detail: list[ValidationIssue]
