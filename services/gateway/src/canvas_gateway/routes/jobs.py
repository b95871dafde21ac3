"""Jobs: create one, read its status and its events, list them, cancel one, run a
final one again."""

from __future__ import annotations

import base64
import binascii
import contextlib
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID, uuid4, uuid5

import structlog
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError

from canvas_events.auth import Principal
from canvas_events.envelope import Envelope, utcnow
from canvas_events.errors import PublishError
from canvas_events.events import JobCancelRequested
from canvas_events.publishing import BatchPublisher
from canvas_gateway.budget import budget_of, budget_refusal
from canvas_gateway.deps import (
    CorrelationId,
    CurrentUser,
    LedgerDep,
    MetricsDep,
    PublisherDep,
    SettingsDep,
    StoreDep,
)
from canvas_gateway.errors import StoreUnavailable
from canvas_gateway.ledger import LedgerSweep
from canvas_gateway.metrics import Metrics
from canvas_gateway.routes import error_responses
from canvas_gateway.schemas import (
    FINAL_STATUSES,
    IDEMPOTENCY_KEY_PATTERN,
    CancelAccepted,
    JobAccepted,
    JobCreate,
    JobEventPublic,
    JobEventsPublic,
    JobPublic,
    JobsPublic,
    JobStatus,
    RetryAccepted,
)
from canvas_gateway.settings import Settings
from canvas_gateway.store import Admission, JobRequest, Limits, Store
from canvas_store.errors import BudgetSpent, CanvasTaken, LimitReached

log = structlog.get_logger("canvas_gateway.jobs")
router = APIRouter(prefix="/api/ai-agent", tags=["jobs"])

# Fixed forever: job ids of keyed requests derive from the namespace, the user and the
# key, so a retry through any gateway replica lands on the same job.
IDEMPOTENCY_NAMESPACE = UUID("6f0f5c2e-3c1b-4f0e-9b7a-5a8d2c4e1f30")
# Seconds a client should wait before trying again after a 429 or a 503.
LIMIT_RETRY_AFTER = "10"
UNAVAILABLE_RETRY_AFTER = "5"


def job_id_for(user_id: str, idempotency_key: str | None) -> UUID:
    """The job id of a request: derived from the key when there is one, else random.

    The user's id goes in with its length, so that no user and key can be read as
    another's: user ``x:y`` with key ``z`` and user ``x`` with key ``y:z`` get different
    ids (a plain ``user:key`` gave them the same one)."""
    if idempotency_key is None:
        return uuid4()
    return uuid5(IDEMPOTENCY_NAMESPACE, f"{len(user_id)}:{user_id}:{idempotency_key}")


def _not_found() -> HTTPException:
    # The same answer for a job that does not exist and one that is someone else's.
    return HTTPException(status.HTTP_404_NOT_FOUND, detail="job not found")


def _unavailable() -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail="the job queue is unavailable; nothing was queued, try again later",
        headers={"Retry-After": UNAVAILABLE_RETRY_AFTER},
    )


class Intake:
    """What accepting a request takes: the ledger, the broker, the limits. One per request
    (a FastAPI dependency, ``IntakeDep``), shared by create and retry."""

    def __init__(
        self,
        store: Store,
        publisher: BatchPublisher,
        metrics: Metrics,
        settings: Settings,
        ledger: LedgerSweep,
        correlation_id: str,
        request: Request,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.settings = settings
        self.ledger = ledger
        self.correlation_id = correlation_id
        self.request = request

    async def accept(
        self, wanted: JobRequest, *, caller: Principal, canvas_given: bool
    ) -> JobRequest:
        """``wanted`` recorded and published (or the earlier request with its key); the
        4xx or 503 that says why not. ``caller``: who asks (an admin is exempt from the
        daily token budget, also when asking for another user's job)."""
        admission = await _admit(
            self.store, self.metrics, self.settings, caller, wanted, canvas_given
        )
        job = admission.request
        # Bound only now: a refused request has no job to trace.
        structlog.contextvars.bind_contextvars(job_id=str(job.job_id))
        self.request.state.job_id = str(job.job_id)
        await _publish(
            self.store, self.publisher, self.metrics, self.ledger, job, self.correlation_id
        )
        if not admission.duplicate:
            self.metrics.jobs_accepted.inc()
        log.info(
            "job accepted",
            canvas_id=job.canvas_id,
            priority=job.priority,
            duplicate=admission.duplicate,
            retry_of=str(job.retry_of) if job.retry_of else None,
        )
        return job


async def _intake(
    store: StoreDep,
    publisher: PublisherDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    ledger: LedgerDep,
    correlation_id: CorrelationId,
    request: Request,
) -> Intake:
    """The request's Intake. Async, though it awaits nothing: FastAPI makes a class
    dependency in its thread pool, a hop per POST (canvas_gateway.deps says what that
    cost)."""
    return Intake(store, publisher, metrics, settings, ledger, correlation_id, request)


IntakeDep = Annotated[Intake, Depends(_intake)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Any 1..200 printable characters; a retry with the same key gets the same job.",
    ),
]


def _accepted(job: JobRequest) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "canvas_id": job.canvas_id,
        "status_url": f"/api/ai-agent/job/{job.job_id}/status",
        "events_url": f"/api/ai-agent/job/{job.job_id}/events",
    }


@router.post(
    "/create-canvas",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Ask for a drawing",
    description="Queues a job that draws `query` on a canvas. Answers 202 only once the "
    "broker confirmed the request. The same `Idempotency-Key` from the same user always "
    "answers with the same job and never makes a second one.",
    responses=error_responses(401, 404, 413, 422, 429, 503),
)
async def create_canvas(
    body: JobCreate,
    user: CurrentUser,
    intake: IntakeDep,
    idempotency_key: IdempotencyKey = None,
) -> JobAccepted:
    wanted = JobRequest(
        job_id=job_id_for(user.user_id, idempotency_key),
        user_id=user.user_id,
        canvas_id=body.canvas_id or str(uuid4()),
        priority=body.priority,
        query=body.query,
        options=body.options,
        idempotency_key=idempotency_key,
        correlation_id=intake.correlation_id,
        created_at=utcnow(),  # the ledger's insert sets the time that counts
        confirmed_at=None,
    )
    job = await intake.accept(wanted, caller=user, canvas_given=body.canvas_id is not None)
    return JobAccepted(**_accepted(job))


@router.post(
    "/job/{job_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Run a final job again",
    description="A failed, cancelled or completed job runs again as a new job with the same "
    "query, canvas, priority and options, whose status carries `retry_of`. Its owner or an "
    "admin may ask; the new job is the owner's. 409 while the job is not final. "
    "`Idempotency-Key` works as on create.",
    responses=error_responses(401, 404, 409, 422, 429, 503),
)
async def retry_job(
    job_id: UUID,
    user: CurrentUser,
    intake: IntakeDep,
    idempotency_key: IdempotencyKey = None,
) -> RetryAccepted:
    source = await intake.store.job_request(job_id)
    if source is None or (source["user_id"] != user.user_id and not user.is_admin):
        raise _not_found()
    if source["status"] not in FINAL_STATUSES:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job is {source['status']}; only a failed, cancelled or completed job "
            "can run again",
        )
    owner: str = source["user_id"]
    key = retry_key(job_id, user.user_id, idempotency_key) if idempotency_key else None
    wanted = JobRequest(
        job_id=job_id_for(owner, key),
        user_id=owner,
        canvas_id=source["canvas_id"],
        priority=source["priority"],
        query=source["query"],
        options=source["options"],
        idempotency_key=key,
        correlation_id=intake.correlation_id,
        created_at=utcnow(),
        confirmed_at=None,
        retry_of=job_id,
    )
    # The canvas is the owner's: the job being retried drew on it.
    job = await intake.accept(wanted, caller=user, canvas_given=False)
    return RetryAccepted(**_accepted(job), retry_of=job_id)


def retry_key(job_id: UUID, caller: str, idempotency_key: str) -> str:
    """The ledger's key of a keyed retry: its own namespace (a retry and a create with
    the same key are different requests), and the caller's (an admin's key never meets
    the owner's)."""
    return f"retry:{job_id}:{len(caller)}:{caller}:{idempotency_key}"


async def _admit(
    store: Store,
    metrics: Metrics,
    settings: Settings,
    caller: Principal,
    wanted: JobRequest,
    canvas_given: bool,
) -> Admission:
    """The ledger's row for ``wanted``: new, or the earlier one with its key; 429 over
    the user's limit or the caller's daily token budget (canvas_gateway.budget), 404
    for someone else's canvas."""
    now = utcnow()
    limits = Limits(
        active=settings.max_active_jobs_per_user,
        in_flight_seconds=settings.publish_timeout_seconds * 2,
        budget=budget_of(settings, caller, now),
    )
    try:
        return await store.admit(wanted, canvas_given=canvas_given, limits=limits)
    except BudgetSpent as exc:
        metrics.jobs_rejected.labels("budget").inc()
        log.info("job refused: daily token budget used", used=exc.used, budget=exc.budget)
        raise budget_refusal(exc, now) from None
    except LimitReached as exc:
        metrics.jobs_rejected.labels("limit").inc()
        log.info("job refused: user over the limit", active=exc.active, limit=exc.limit)
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"too many unfinished jobs ({exc.active}, limit {exc.limit}); "
            "wait for one to finish",
            headers={"Retry-After": LIMIT_RETRY_AFTER},
        ) from None
    except CanvasTaken:
        metrics.jobs_rejected.labels("canvas").inc()
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="canvas not found") from None


async def _publish(
    store: Store,
    publisher: BatchPublisher,
    metrics: Metrics,
    ledger: LedgerSweep,
    job: JobRequest,
    correlation_id: str,
) -> None:
    """Publish ``job``'s JobRequested and mark its ledger row confirmed; 503 when the
    broker does not confirm it (a request without a key is then forgotten)."""
    try:
        # A duplicate publishes again: its first publish may have failed, and the
        # orchestrator ignores a JobRequested for a stream that exists.
        await publisher.publish(job.requested(correlation_id))
    except PublishError as exc:
        metrics.publish_failures.inc()
        metrics.jobs_rejected.labels("publish").inc()
        log.warning("job not accepted: broker did not confirm", error=str(exc))
        # A keyed row stays: its retry must find the same job id and publish again.
        if job.idempotency_key is None:
            with contextlib.suppress(StoreUnavailable):
                await store.discard(job.job_id)
        raise _unavailable() from None
    try:
        await store.confirm(job.job_id)
    except StoreUnavailable as exc:
        # The job is queued whatever happens here; the ledger is told as soon as it can.
        log.warning("job queued but not marked confirmed yet", error=str(exc))
        ledger.confirm_later(job.job_id)


@router.get(
    "/job/{job_id}/status",
    summary="A job's status",
    description="Answers 200 from the moment the create call answered 202.",
    responses=error_responses(401, 404, 422, 503),
)
async def job_status(job_id: UUID, user: CurrentUser, store: StoreDep) -> JobPublic:
    job = await store.job(user.user_id, job_id)
    if job is None:
        raise _not_found()
    return JobPublic.model_validate(job)


@router.get(
    "/job/{job_id}/events",
    summary="A job's event stream",
    description="Every recorded event of the job, in order (empty until the orchestrator "
    "recorded its first).",
    responses=error_responses(401, 404, 422, 503),
)
async def job_events(job_id: UUID, user: CurrentUser, store: StoreDep) -> JobEventsPublic:
    events = await store.events(user.user_id, job_id)
    if events is None:
        raise _not_found()
    return JobEventsPublic(
        job_id=job_id, events=[JobEventPublic.model_validate(event) for event in events]
    )


@router.get(
    "/jobs",
    summary="The caller's jobs, newest first",
    responses=error_responses(401, 422, 503),
)
async def list_jobs(
    user: CurrentUser,
    store: StoreDep,
    status_: StatusFilter = None,
    limit: PageSize = 20,
    cursor: PageCursor = None,
) -> JobsPublic:
    after = decode_cursor(cursor) if cursor is not None else None
    rows = await store.jobs(user.user_id, status=status_, after=after, limit=limit)
    return JobsPublic(
        jobs=[JobPublic.model_validate(row) for row in rows], next_cursor=next_cursor(rows, limit)
    )


@router.post(
    "/job/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel a job",
    description="The job ends `cancelled` and none of its objects reach the canvas.",
    responses=error_responses(401, 404, 409, 422, 503),
)
async def cancel_job(
    job_id: UUID,
    user: CurrentUser,
    store: StoreDep,
    publisher: PublisherDep,
    metrics: MetricsDep,
    correlation_id: CorrelationId,
) -> CancelAccepted:
    job = await store.job(user.user_id, job_id)
    if job is None:
        raise _not_found()
    structlog.contextvars.bind_contextvars(job_id=str(job_id))
    if job["status"] in FINAL_STATUSES:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job is already {job['status']}")
    envelope = Envelope.wrap(
        JobCancelRequested(reason="cancelled by the user"),
        correlation_id=correlation_id,
        job_id=job_id,
        user_id=user.user_id,
        canvas_id=job["canvas_id"],
    )
    # Recorded before the answer, where the orchestrator looks before it records a start
    # or a result: whichever message reaches it first, the cancel wins.
    verdict = await store.request_cancel(user.user_id, job_id, envelope)
    if verdict is None:
        raise _not_found()
    if verdict != "requested":
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"job is already {verdict}")
    try:
        await publisher.publish(envelope)
    except PublishError as exc:
        # The request is recorded and wins at the job's next step all the same; the
        # message only makes it take effect (and reach a running model call) at once.
        metrics.publish_failures.inc()
        log.warning(
            "cancel recorded but not sent; it applies at the job's next step", error=str(exc)
        )
    log.info("job cancel requested")
    return CancelAccepted(job_id=job_id)


# The parameters of a page of jobs (the caller's, or every user's for an admin).
StatusFilter = Annotated[
    JobStatus | None, Query(alias="status", description="Only jobs in this status.")
]
PageSize = Annotated[int, Query(ge=1, le=100, description="Page size.")]
PageCursor = Annotated[
    str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
]


def next_cursor(rows: list[dict[str, Any]], limit: int) -> str | None:
    """The cursor after a full page of ``rows``; None after the last page."""
    if len(rows) < limit:
        return None
    return encode_cursor(rows[-1]["created_at"], rows[-1]["id"])


def encode_cursor(created_at: datetime, job_id: UUID) -> str:
    """An opaque cursor: where the page ended."""
    raw = f"{created_at.isoformat()}|{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """The position an :func:`encode_cursor` cursor names; 422 for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, job_id = raw.partition("|")
        at = datetime.fromisoformat(created)
        if at.tzinfo is None:
            raise ValueError("naive timestamp")
        return at, UUID(job_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        issue: dict[str, Any] = {
            "loc": ("query", "cursor"),
            "msg": "not a cursor this API returned",
            "type": "value_error",
        }
        raise RequestValidationError([issue]) from None
