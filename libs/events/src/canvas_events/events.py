"""The domain events of canvas-jobs: frozen, past-tense facts with a schema version.

Each event is the ``data`` of an :class:`~canvas_events.envelope.Envelope` whose
``type`` is the class name. Who publishes what (routing keys in
:mod:`canvas_events.topology`):

- gateway: JobRequested, JobCancelRequested
- ai-generator: GenerationStarted, GenerationProgressed, GenerationSucceeded,
  GenerationFailed (each names the attempt it belongs to)
- job-orchestrator: records all of the above in the job's stream and adds JobQueued,
  GenerationRequested, JobRetryScheduled, JobCompleted, JobFailed, JobCancelled; its
  relay republishes every recorded event, with its global position, for the
  generators and notifiers.

A schema change bumps ``SCHEMA_VERSION`` and registers an upcaster from the old
version (see :func:`register_upcaster`), so stored events and in-flight messages of
the old shape still parse.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from canvas_events.envelope import Envelope, validation_summary
from canvas_events.errors import PoisonMessage, UnknownEventType

MAX_QUERY_LENGTH = 2_000


class Event(BaseModel):
    """Base of every domain event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    SCHEMA_VERSION: ClassVar[int] = 1

    @classmethod
    def type_name(cls) -> str:
        """The envelope ``type`` of this event: its class name."""
        return cls.__name__


class JobRequested(Event):
    """A user asked for a drawing; the gateway accepted it (202)."""

    query: str = Field(min_length=1, max_length=MAX_QUERY_LENGTH)
    canvas_id: str
    priority: int = Field(ge=0, le=9)
    options: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = None
    # The final job this one runs again (POST .../retry); absent otherwise.
    retry_of: UUID | None = None

    @model_serializer(mode="wrap")
    def _without_absent_retry(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A first run is written as before retries existed, so that a consumer of that
        # shape (extra fields are refused) still reads every job that is not a retry.
        data: dict[str, Any] = handler(self)
        if data.get("retry_of") is None:
            data.pop("retry_of", None)
        return data


class JobQueued(Event):
    """The job waits for a generator (first time, or again after a retry)."""

    priority: int = Field(ge=0, le=9)
    retry_count: int = Field(ge=0)


class GenerationRequested(Event):
    """One attempt handed to the generators; a generator must start it before
    ``lease_expires_at`` (then GenerationStarted gives it a running lease)."""

    attempt_id: UUID
    attempt: int = Field(ge=1)
    query: str
    options: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(ge=0, le=9)
    lease_expires_at: datetime


class GenerationStarted(Event):
    """A generator took the attempt and is calling the model.

    ``lease_expires_at`` is None as the generator publishes it; the orchestrator's
    recorded copy sets it: the running attempt must end by then. ``run_id`` names this
    run of the attempt: an attempt handed out again (its generator's connection dropped)
    may run twice, and only its newest run's progress and result count. Schema 2 added
    it; events of schema 1 name no run.
    """

    SCHEMA_VERSION: ClassVar[int] = 2

    attempt_id: UUID
    model: str
    generator_id: str
    lease_expires_at: datetime | None = None
    run_id: UUID | None = None


class GenerationProgressed(Event):
    """The model has written one more valid object (streamed before completion)."""

    SCHEMA_VERSION: ClassVar[int] = 2

    attempt_id: UUID
    index: int = Field(ge=0)
    object: dict[str, Any]
    run_id: UUID | None = None


class GenerationSucceeded(Event):
    """The model answered with at least one valid object."""

    SCHEMA_VERSION: ClassVar[int] = 2

    attempt_id: UUID
    objects: list[dict[str, Any]] = Field(min_length=1)
    dropped_objects: int = Field(ge=0)
    model: str
    usage: dict[str, int] = Field(default_factory=dict)
    latency_ms: int = Field(ge=0)
    run_id: UUID | None = None


class GenerationFailed(Event):
    """The attempt failed; ``retryable`` says whether another attempt may succeed. The
    orchestrator's own verdict on an expired lease names no run."""

    SCHEMA_VERSION: ClassVar[int] = 2

    attempt_id: UUID
    error: str
    kind: str
    retryable: bool
    retry_after_seconds: float | None = None
    run_id: UUID | None = None


class JobRetryScheduled(Event):
    """A retryable failure: the job is queued again at ``next_attempt_at``.
    ``retry_count`` is the retries counted so far, this one included; a deferral for the
    model's rate limit (a 429) counts none, so it may stay 0."""

    retry_count: int = Field(ge=0)
    next_attempt_at: datetime
    error: str


class JobCompleted(Event):
    """The job's objects are on the canvas."""

    object_count: int = Field(ge=0)
    object_ids: list[str]
    dropped_objects: int = Field(ge=0)
    model: str
    usage: dict[str, int] = Field(default_factory=dict)
    latency_ms: int = Field(ge=0)


class JobFailed(Event):
    """The job ended without objects; ``error`` says why in words a user can act on."""

    error: str
    retry_count: int = Field(ge=0)


class JobCancelRequested(Event):
    """The user asked to cancel the job."""

    reason: str | None = None


class JobCancelled(Event):
    """The job ended cancelled; none of its objects reach the canvas."""

    reason: str | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type_name(): cls
    for cls in (
        JobRequested,
        JobQueued,
        GenerationRequested,
        GenerationStarted,
        GenerationProgressed,
        GenerationSucceeded,
        GenerationFailed,
        JobRetryScheduled,
        JobCompleted,
        JobFailed,
        JobCancelRequested,
        JobCancelled,
    )
}

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def register_upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that turns ``type_name`` data of ``from_version`` into the next one."""

    def register(fn: Upcaster) -> Upcaster:
        _UPCASTERS[(type_name, from_version)] = fn
        return fn

    return register


def _no_run(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 of the generation events named no run (``run_id`` None)."""
    return data


for _type in (
    "GenerationStarted",
    "GenerationProgressed",
    "GenerationSucceeded",
    "GenerationFailed",
):
    register_upcaster(_type, 1)(_no_run)


def event_class(envelope: Envelope) -> type[Event]:
    """The event class of an envelope's ``type``, for a schema version this build reads.

    Raises :class:`UnknownEventType` for a type this build does not know and
    :class:`PoisonMessage` for a schema version from the future. The broker checks this
    for every consumer before its handler runs (docs/events.md), whether or not the
    handler reads the event's data.
    """
    cls = EVENT_TYPES.get(envelope.type)
    if cls is None:
        raise UnknownEventType(f"unknown event type {envelope.type!r}")
    if envelope.schema_version > cls.SCHEMA_VERSION:
        raise PoisonMessage(
            f"{envelope.type} schema_version {envelope.schema_version} is newer than this "
            f"build's {cls.SCHEMA_VERSION}"
        )
    return cls


def parse_event(envelope: Envelope) -> Event:
    """The typed event inside an envelope, upcast to the current schema.

    Raises :class:`UnknownEventType` for a type this build does not know and
    :class:`PoisonMessage` for a schema version from the future, or data that does not
    fit the schema: neither can succeed on a retry.
    """
    cls = event_class(envelope)
    version, data = envelope.schema_version, dict(envelope.data)
    while version < cls.SCHEMA_VERSION:
        upcast = _UPCASTERS.get((envelope.type, version))
        if upcast is None:
            raise PoisonMessage(f"no upcaster for {envelope.type} schema_version {version}")
        data, version = upcast(data), version + 1
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise PoisonMessage(
            f"{envelope.type} data does not fit schema: {validation_summary(exc)}"
        ) from None
