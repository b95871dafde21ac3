"""The notifier's WebSocket protocol (docs/api.md), without I/O.

Server to client, one JSON text frame per recorded status event::

    {"type", "job_id", "canvas_id", "position", "occurred_at", "data"}

    JobQueued           → ai_job_queued            data: priority, retry_count
    GenerationStarted   → ai_generation_started    data: model, attempt_id
    GenerationProgressed→ ai_generation_progress   data: index, object, attempt_id
    JobCompleted        → ai_generation_completed  data: object_count, object_ids,
                                                         dropped_objects, model, usage,
                                                         latency_ms
    JobRetryScheduled   → ai_job_error             data: retryable true, final false,
                                                         next_attempt_at, error, retry_count
    JobFailed           → ai_job_error             data: retryable false, final true,
                                                         next_attempt_at null, error,
                                                         retry_count
    JobCancelled        → ai_job_cancelled         data: reason

Every other event type is not sent. Control frames carry no position:
``{"type": "subscribed" | "unsubscribed", ...}`` answer the client's messages and
``{"type": "error", "detail"}`` answers one the notifier cannot take.

Client to server: ``{"type": "subscribe", "job_id" | "canvas_id"}`` narrows the stream
to the union of what was subscribed; ``{"type": "unsubscribe", "job_id" | "canvas_id"}``
drops one, and a bare ``{"type": "unsubscribe"}`` widens to every event again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import orjson
from pydantic import TypeAdapter

from canvas_events.envelope import Envelope
from canvas_events.events import (
    Event,
    GenerationProgressed,
    GenerationStarted,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobRetryScheduled,
    parse_event,
)

# Subscriptions one connection may hold: each costs a set entry and a check per frame.
MAX_SUBSCRIPTIONS: Final = 100
_MAX_ID_LENGTH: Final = 128

# The same rendering as the gateway's JSON (pydantic's), so that a replayed event and
# its live copy are byte for byte the same frame.
_DATETIME: Final = TypeAdapter(datetime)


def _queued(event: JobQueued) -> dict[str, Any]:
    return {"priority": event.priority, "retry_count": event.retry_count}


def _started(event: GenerationStarted) -> dict[str, Any]:
    return {"model": event.model, "attempt_id": str(event.attempt_id)}


def _progress(event: GenerationProgressed) -> dict[str, Any]:
    # attempt_id lets a client drop the partial drawing of an attempt that later failed.
    return {"index": event.index, "object": event.object, "attempt_id": str(event.attempt_id)}


def _completed(event: JobCompleted) -> dict[str, Any]:
    return event.model_dump(
        mode="json",
        include={"object_count", "object_ids", "dropped_objects", "model", "usage", "latency_ms"},
    )


def _retry(event: JobRetryScheduled) -> dict[str, Any]:
    return {
        "retryable": True,
        "final": False,
        "next_attempt_at": _DATETIME.dump_python(event.next_attempt_at, mode="json"),
        "error": event.error,
        "retry_count": event.retry_count,
    }


def _failed(event: JobFailed) -> dict[str, Any]:
    return {
        "retryable": False,
        "final": True,
        "next_attempt_at": None,
        "error": event.error,
        "retry_count": event.retry_count,
    }


def _cancelled(event: JobCancelled) -> dict[str, Any]:
    return {"reason": event.reason}


# event type → (frame type, data of the frame). Typed per event; the table is the
# one place that says which events reach clients.
_MAPPING: Final[dict[str, tuple[str, Callable[[Any], dict[str, Any]]]]] = {
    JobQueued.type_name(): ("ai_job_queued", _queued),
    GenerationStarted.type_name(): ("ai_generation_started", _started),
    GenerationProgressed.type_name(): ("ai_generation_progress", _progress),
    JobCompleted.type_name(): ("ai_generation_completed", _completed),
    JobRetryScheduled.type_name(): ("ai_job_error", _retry),
    JobFailed.type_name(): ("ai_job_error", _failed),
    JobCancelled.type_name(): ("ai_job_cancelled", _cancelled),
}

STATUS_TYPES: Final[tuple[str, ...]] = tuple(_MAPPING)
"""The event types clients see; replay selects only these."""


@dataclass(frozen=True)
class Frame:
    """One status event, rendered once and shared by every connection it goes to."""

    position: int
    type: str
    job_id: str
    canvas_id: str | None
    # The JSON text, UTF-8 encoded once: every connection writes these same bytes.
    data: bytes


def to_frame(envelope: Envelope) -> Frame | None:
    """The client frame of a recorded event, or None when clients do not see it.

    None also for an event without a position (not recorded) or without a job. Raises
    :class:`~canvas_events.errors.PoisonMessage` when a status event's data does not
    fit its schema.
    """
    mapping = _MAPPING.get(envelope.type)
    if mapping is None or envelope.position is None or envelope.job_id is None:
        return None
    frame_type, render = mapping
    event: Event = parse_event(envelope)
    job_id = str(envelope.job_id)
    body = {
        "type": frame_type,
        "job_id": job_id,
        "canvas_id": envelope.canvas_id,
        "position": envelope.position,
        "occurred_at": _DATETIME.dump_python(envelope.occurred_at, mode="json"),
        "data": render(event),
    }
    return Frame(
        position=envelope.position,
        type=frame_type,
        job_id=job_id,
        canvas_id=envelope.canvas_id,
        data=orjson.dumps(body),
    )


def control(frame_type: str, **fields: Any) -> bytes:
    """A control frame (no position): ``subscribed``, ``unsubscribed``, ``error``."""
    return orjson.dumps({"type": frame_type, **fields})


def error(detail: str, **fields: Any) -> bytes:
    """``{"type": "error", "detail": ...}``: the connection stays open."""
    return control("error", detail=detail, **fields)


# -- what a connection wants to see ------------------------------------------------------


@dataclass(frozen=True)
class Subscription:
    """The jobs and canvases a connection narrowed its stream to; empty means all."""

    job_ids: frozenset[str] = field(default_factory=frozenset)
    canvas_ids: frozenset[str] = field(default_factory=frozenset)

    @property
    def size(self) -> int:
        """How many jobs and canvases are subscribed."""
        return len(self.job_ids) + len(self.canvas_ids)

    def matches(self, frame: Frame) -> bool:
        """Whether ``frame`` goes to this connection."""
        if not self.job_ids and not self.canvas_ids:
            return True
        return frame.job_id in self.job_ids or (
            frame.canvas_id is not None and frame.canvas_id in self.canvas_ids
        )

    def add(self, target: Target) -> Subscription:
        """This subscription with ``target`` added."""
        if target.kind == "job_id":
            return Subscription(self.job_ids | {target.id}, self.canvas_ids)
        return Subscription(self.job_ids, self.canvas_ids | {target.id})

    def remove(self, target: Target | None) -> Subscription:
        """This subscription without ``target``; without any (None) when ``target`` is None."""
        if target is None:
            return Subscription()
        if target.kind == "job_id":
            return Subscription(self.job_ids - {target.id}, self.canvas_ids)
        return Subscription(self.job_ids, self.canvas_ids - {target.id})


# -- what a client sends -----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A job or a canvas named in a client message."""

    kind: str  # "job_id" or "canvas_id": the key clients use
    id: str

    def as_fields(self) -> dict[str, str]:
        """``{"job_id": id}`` or ``{"canvas_id": id}``."""
        return {self.kind: self.id}


@dataclass(frozen=True)
class Subscribe:
    """Narrow the stream to a job or a canvas (added to earlier subscriptions)."""

    target: Target


@dataclass(frozen=True)
class Unsubscribe:
    """Drop one subscription, or every one (target None)."""

    target: Target | None


@dataclass(frozen=True)
class Invalid:
    """A message the notifier cannot take; ``detail`` says why (sent back as an error)."""

    detail: str


ClientMessage = Subscribe | Unsubscribe | Invalid


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """Read one client message; anything unexpected is :class:`Invalid`, never an error."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Invalid("message is not JSON")
    if not isinstance(message, dict):
        return Invalid("message must be a JSON object")
    kind = message.get("type")
    if kind not in ("subscribe", "unsubscribe"):
        return Invalid("type must be 'subscribe' or 'unsubscribe'")
    unknown = set(message) - {"type", "job_id", "canvas_id"}
    if unknown:
        return Invalid(f"unknown fields: {', '.join(sorted(map(str, unknown)))[:200]}")
    target = _target(message)
    if isinstance(target, Invalid):
        return target
    if kind == "subscribe":
        if target is None:
            return Invalid("subscribe needs a job_id or a canvas_id")
        return Subscribe(target)
    return Unsubscribe(target)


def _target(message: dict[str, Any]) -> Target | Invalid | None:
    job_id, canvas_id = message.get("job_id"), message.get("canvas_id")
    if job_id is not None and canvas_id is not None:
        return Invalid("give a job_id or a canvas_id, not both")
    if job_id is not None:
        if not isinstance(job_id, str):
            return Invalid("job_id must be a string")
        try:
            # The canonical form, as frames carry it.
            return Target("job_id", str(UUID(job_id)))
        except ValueError:
            return Invalid("job_id must be a UUID")
    if canvas_id is not None:
        if not isinstance(canvas_id, str) or not 1 <= len(canvas_id) <= _MAX_ID_LENGTH:
            return Invalid(f"canvas_id must be a string of 1 to {_MAX_ID_LENGTH} characters")
        return Target("canvas_id", canvas_id)
    return None
