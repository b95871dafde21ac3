"""A job as the CLI shows it, folded from the notifier's frames; no I/O here.

Two sources give the same frames (docs/api.md): the notifier live, and the
gateway's recorded events, turned into frames by :func:`frame_from_event` (so that a
finished job replays exactly like a live one, and ``--json`` prints one format).
Frames are applied in position order and at most once: positions are commit-ordered,
so a frame at or below the last applied one has been applied already.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

QUEUED: Final = "ai_job_queued"
STARTED: Final = "ai_generation_started"
PROGRESS: Final = "ai_generation_progress"
COMPLETED: Final = "ai_generation_completed"
ERROR: Final = "ai_job_error"
CANCELLED: Final = "ai_job_cancelled"
FRAME_TYPES: Final = frozenset({QUEUED, STARTED, PROGRESS, COMPLETED, ERROR, CANCELLED})


# Recorded event type → (frame type, the frame's data): the notifier's own table
# (canvas_notifier.frames), which a client cannot import.
def _queued(data: dict[str, Any]) -> dict[str, Any]:
    return {"priority": data.get("priority"), "retry_count": data.get("retry_count", 0)}


def _started(data: dict[str, Any]) -> dict[str, Any]:
    return {"model": data.get("model"), "attempt_id": data.get("attempt_id")}


def _progress(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": data.get("index"),
        "object": data.get("object"),
        "attempt_id": data.get("attempt_id"),
    }


def _completed(data: dict[str, Any]) -> dict[str, Any]:
    keys = ("object_count", "object_ids", "dropped_objects", "model", "usage", "latency_ms")
    return {key: data.get(key) for key in keys}


def _retry(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "retryable": True,
        "final": False,
        "next_attempt_at": data.get("next_attempt_at"),
        "error": data.get("error"),
        "retry_count": data.get("retry_count"),
    }


def _failed(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "retryable": False,
        "final": True,
        "next_attempt_at": None,
        "error": data.get("error"),
        "retry_count": data.get("retry_count"),
    }


def _cancelled(data: dict[str, Any]) -> dict[str, Any]:
    return {"reason": data.get("reason")}


_EVENT_FRAMES: Final[dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]]] = {
    "JobQueued": (QUEUED, _queued),
    "GenerationStarted": (STARTED, _started),
    "GenerationProgressed": (PROGRESS, _progress),
    "JobCompleted": (COMPLETED, _completed),
    "JobRetryScheduled": (ERROR, _retry),
    "JobFailed": (ERROR, _failed),
    "JobCancelled": (CANCELLED, _cancelled),
}


def frame_from_event(
    job_id: str, canvas_id: str | None, event: dict[str, Any]
) -> dict[str, Any] | None:
    """The notifier frame of one recorded event (the gateway's ``events`` item), or
    None for the events clients do not see (JobRequested, GenerationRequested, ...)."""
    mapping = _EVENT_FRAMES.get(event.get("type", ""))
    if mapping is None:
        return None
    frame_type, render = mapping
    return {
        "type": frame_type,
        "job_id": job_id,
        "canvas_id": canvas_id,
        "position": event.get("position"),
        "occurred_at": event.get("occurred_at"),
        "data": render(event.get("data") or {}),
    }


def canvas_of(events: list[dict[str, Any]]) -> str | None:
    """The job's canvas, from its JobRequested event."""
    for event in events:
        if event.get("type") == "JobRequested":
            canvas = (event.get("data") or {}).get("canvas_id")
            return canvas if isinstance(canvas, str) else None
    return None


def is_final(frame: dict[str, Any]) -> bool:
    """Whether a frame ends its job."""
    kind = frame.get("type")
    if kind in (COMPLETED, CANCELLED):
        return True
    return kind == ERROR and bool((frame.get("data") or {}).get("final"))


@dataclass
class Failure:
    """One failed attempt, or the job's final failure."""

    error: str
    final: bool
    retry_count: int | None
    next_attempt_at: str | None
    occurred_at: str | None


@dataclass
class JobView:
    """What the CLI knows of one job, from the frames applied so far."""

    job_id: str
    canvas_id: str | None = None
    status: str = "submitted"  # until the first frame: accepted, not recorded yet
    last_position: int | None = None
    attempts: int = 0
    model: str | None = None
    priority: int | None = None
    retry_count: int = 0
    next_attempt_at: str | None = None
    # The current attempt's objects by index, as they stream in; emptied when an attempt
    # fails or the job is cancelled (they never reach the canvas).
    objects: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    reason: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    _attempt_id: str | None = None

    @property
    def outcome(self) -> str | None:
        """``completed``, ``failed`` or ``cancelled`` once the job ended, else None."""
        return self.status if self.status in ("completed", "failed", "cancelled") else None

    def apply(self, frame: dict[str, Any]) -> bool:
        """Fold one frame of this job in; False (nothing changes) for a frame of another
        job, one already applied, one of an unknown type, or any after the job ended."""
        if frame.get("job_id") != self.job_id or frame.get("type") not in FRAME_TYPES:
            return False
        position = frame.get("position")
        if isinstance(position, int):
            if self.last_position is not None and position <= self.last_position:
                return False
            self.last_position = position
        if self.outcome is not None:
            return False
        if self.canvas_id is None and isinstance(frame.get("canvas_id"), str):
            self.canvas_id = frame["canvas_id"]
        data: dict[str, Any] = frame.get("data") or {}
        at = frame.get("occurred_at")
        kind = frame["type"]
        if kind == QUEUED:
            self.status = "queued"
            self.priority = data.get("priority", self.priority)
            self.retry_count = data.get("retry_count") or self.retry_count
            self.next_attempt_at = None
        elif kind == STARTED:
            self.status = "processing"
            self.attempts += 1
            self.model = data.get("model") or self.model
            self._attempt_id = data.get("attempt_id")
            self.objects = {}
            self.started_at = self.started_at or at
        elif kind == PROGRESS:
            self._progress(data)
        elif kind == COMPLETED:
            self.status = "completed"
            self.result = data
            self.model = data.get("model") or self.model
            self.ended_at = at
        elif kind == ERROR:
            self._error(data, at)
        elif kind == CANCELLED:
            self.status = "cancelled"
            self.reason = data.get("reason")
            self.objects = {}
            self.ended_at = at
        return True

    def _progress(self, data: dict[str, Any]) -> None:
        attempt = data.get("attempt_id")
        if attempt is not None and self._attempt_id is not None and attempt != self._attempt_id:
            # An object of an attempt other than the running one (a late frame of a
            # superseded attempt): it will never reach the canvas.
            return
        index, obj = data.get("index"), data.get("object")
        if isinstance(index, int) and isinstance(obj, dict):
            self.status = "processing"
            self.objects[index] = obj

    def _error(self, data: dict[str, Any], at: str | None) -> None:
        final = bool(data.get("final"))
        failure = Failure(
            error=str(data.get("error") or "unknown error"),
            final=final,
            retry_count=data.get("retry_count"),
            next_attempt_at=data.get("next_attempt_at"),
            occurred_at=at,
        )
        self.failures.append(failure)
        # The failed attempt's partial drawing never reaches the canvas.
        self.objects = {}
        if isinstance(failure.retry_count, int):
            self.retry_count = failure.retry_count
        if final:
            self.status = "failed"
            self.error = failure.error
            self.ended_at = at
        else:
            self.status = "retry_scheduled"
            self.next_attempt_at = failure.next_attempt_at

    @property
    def object_count(self) -> int:
        """Objects drawn: the final count once completed, else those streamed so far."""
        if self.result is not None and isinstance(self.result.get("object_count"), int):
            count: int = self.result["object_count"]
            return count
        return len(self.objects)


# -- one line per frame, for logs and pipes ---------------------------------------------


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int | float) else "?"


def describe_object(obj: dict[str, Any]) -> str:
    """One object in a few words: ``rectangle at (100, 80) 200x60 "Login"``."""
    kind = str(obj.get("type", "object"))
    parts = [kind]
    if "points" in obj and isinstance(obj["points"], list):
        points = [p for p in obj["points"] if isinstance(p, list | tuple) and len(p) == 2]
        if points:
            first, last = points[0], points[-1]
            parts.append(
                f"({_number(first[0])}, {_number(first[1])}) → "
                f"({_number(last[0])}, {_number(last[1])})"
            )
    elif "x" in obj and "y" in obj:
        parts.append(f"at ({_number(obj['x'])}, {_number(obj['y'])})")
    if "width" in obj and "height" in obj:
        parts.append(f"{_number(obj['width'])}x{_number(obj['height'])}")
    elif "radius" in obj:
        parts.append(f"r={_number(obj['radius'])}")
    text = obj.get("text")
    if isinstance(text, str) and text:
        short = text if len(text) <= 40 else text[:39] + "…"
        parts.append(f'"{short}"')
    return " ".join(parts)


def plural(count: int, word: str) -> str:
    """``1 object``, ``3 objects``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def describe_result(result: dict[str, Any]) -> str:
    """A completed job's result in one phrase: ``5 objects (1 dropped), model m, 1.2 s``."""
    count = result.get("object_count")
    text = plural(count, "object") if isinstance(count, int) else "? objects"
    dropped = result.get("dropped_objects")
    if isinstance(dropped, int) and dropped:
        text += f" ({dropped} invalid dropped)"
    if result.get("model"):
        text += f", model {result['model']}"
    latency = result.get("latency_ms")
    if isinstance(latency, int | float):
        text += f", {latency / 1000:.1f} s"
    return text


def describe_frame(frame: dict[str, Any]) -> str:
    """One frame in one line, as the plain (non-terminal) watch prints it."""
    data: dict[str, Any] = frame.get("data") or {}
    kind = frame.get("type")
    if kind == QUEUED:
        retry = data.get("retry_count") or 0
        again = f", retry {retry}" if retry else ""
        return f"queued (priority {data.get('priority', '?')}{again})"
    if kind == STARTED:
        return f"started: model {data.get('model') or '?'}"
    if kind == PROGRESS:
        obj = data.get("object")
        what = describe_object(obj) if isinstance(obj, dict) else "?"
        return f"object {data.get('index', '?')}: {what}"
    if kind == COMPLETED:
        return f"completed: {describe_result(data)}"
    if kind == ERROR:
        if data.get("final"):
            return f"failed: {data.get('error') or 'unknown error'}"
        when = data.get("next_attempt_at")
        later = f"; retry {data.get('retry_count', '?')} at {short_time(when)}" if when else ""
        return f"error: {data.get('error') or 'unknown error'}{later}"
    if kind == CANCELLED:
        reason = data.get("reason")
        return f"cancelled: {reason}" if reason else "cancelled"
    return str(kind)


def short_time(value: Any) -> str:
    """An ISO 8601 timestamp as local ``HH:MM:SS`` (the input when it is not one)."""
    if not isinstance(value, str):
        return "-" if value is None else str(value)
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return value


def summary(view: JobView) -> str:
    """The last line of a watch: how the job ended (or where it is)."""
    if view.status == "completed":
        result = view.result or {}
        canvas = f" on canvas {view.canvas_id}" if view.canvas_id else ""
        return f"completed: {describe_result(result)}{canvas}"
    if view.status == "failed":
        return f"failed: {view.error or 'unknown error'}"
    if view.status == "cancelled":
        return "cancelled" + (f": {view.reason}" if view.reason else "")
    return view.status
