"""What the orchestrator says once a decision is committed: one log line per recorded
event (two for a completion), and the metrics the events move; for a consumed message,
its outcome's count and line too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import structlog

from canvas_events.envelope import Envelope
from canvas_events.events import (
    GenerationFailed,
    GenerationRequested,
    GenerationSucceeded,
    parse_event,
)
from canvas_orchestrator import domain
from canvas_orchestrator.metrics import Metrics
from canvas_store.events import RecordedEvent

log = structlog.get_logger("canvas_orchestrator.reporting")


@dataclass
class Handled:
    """What one message (or one timer) did."""

    outcome: Literal["recorded", "ignored", "duplicate", "kept"]
    recorded: list[RecordedEvent] = field(default_factory=list)
    reason: str = ""
    # Seconds from the attempt's GenerationRequested to its recorded result, if any.
    attempt_seconds: float | None = None


Level = Literal["debug", "info", "warning", "error"]
# Per event type: the lines it is logged with (level, message, the fields of the event).
_LINES: dict[str, list[tuple[Level, str, Callable[[Any], dict[str, Any]]]]] = {
    "JobRequested": [
        (
            "info",
            "job requested",
            lambda e: {
                "canvas_id": e.canvas_id,
                "priority": e.priority,
                "query_chars": len(e.query),
            },
        )
    ],
    "JobQueued": [("info", "job queued", lambda e: {"retry_count": e.retry_count})],
    "GenerationRequested": [
        (
            "info",
            "attempt dispatched",
            lambda e: {
                "attempt": e.attempt,
                "attempt_id": str(e.attempt_id),
                "lease_expires_at": e.lease_expires_at.isoformat(),
            },
        )
    ],
    "GenerationStarted": [
        (
            "info",
            "attempt started",
            lambda e: {
                "attempt_id": str(e.attempt_id),
                "generator_id": e.generator_id,
                "model": e.model,
            },
        )
    ],
    "GenerationProgressed": [("debug", "attempt progressed", lambda e: {"index": e.index})],
    "GenerationSucceeded": [
        (
            "info",
            "attempt succeeded",
            lambda e: {
                "attempt_id": str(e.attempt_id),
                "objects": len(e.objects),
                "dropped_objects": e.dropped_objects,
            },
        )
    ],
    "GenerationFailed": [
        (
            "warning",
            "attempt failed",
            lambda e: {
                "attempt_id": str(e.attempt_id),
                "error": e.error,
                "kind": e.kind,
                "retryable": e.retryable,
            },
        )
    ],
    "JobRetryScheduled": [
        (
            "warning",
            "retry scheduled",
            lambda e: {
                "retry_count": e.retry_count,
                "next_attempt_at": e.next_attempt_at.isoformat(),
                "error": e.error,
            },
        )
    ],
    "JobCompleted": [
        # Written to canvas_objects in the transaction that recorded JobCompleted.
        (
            "info",
            "objects saved",
            lambda e: {"object_count": e.object_count, "dropped_objects": e.dropped_objects},
        ),
        (
            "info",
            "job completed",
            lambda e: {"object_count": e.object_count, "latency_ms": e.latency_ms},
        ),
    ],
    "JobFailed": [
        ("error", "job failed", lambda e: {"error": e.error, "retry_count": e.retry_count})
    ],
    "JobCancelRequested": [("info", "cancel requested", lambda e: {"reason": e.reason})],
    "JobCancelled": [("info", "job cancelled", lambda e: {})],
}


def report_message(envelope: Envelope, handled: Handled, metrics: Metrics) -> None:
    """What one consumed message did, counted and logged (after its transaction
    committed, in the message's own log context)."""
    metrics.messages.labels(envelope.type, handled.outcome).inc()
    if handled.outcome == "duplicate":
        log.info("duplicate message ignored", message_id=str(envelope.event_id))
    elif handled.outcome == "ignored":
        log.info("message changed nothing", reason=handled.reason)
    elif handled.outcome == "kept":
        log.info("cancel kept until its job is recorded")
    report(handled, metrics)


def report(handled: Handled, metrics: Metrics) -> None:
    """One log line per recorded event, and the metrics they move (after commit)."""
    for item in handled.recorded:
        event = parse_event(item.envelope)
        status = domain.status_reached(event)
        if status is not None:
            metrics.jobs.labels(status.value).inc()
        lines = _LINES.get(event.type_name())
        if lines is None:
            log.info("event recorded", position=item.position, type=event.type_name())
        for level, message, fields in lines or ():
            getattr(log, level)(message, position=item.position, **fields(event))
    if handled.attempt_seconds is not None:
        succeeded = any(
            item.envelope.type == GenerationSucceeded.type_name() for item in handled.recorded
        )
        metrics.attempt_duration.labels("succeeded" if succeeded else "failed").observe(
            handled.attempt_seconds
        )


def attempt_seconds(
    history: Sequence[RecordedEvent], recorded: Sequence[RecordedEvent], now: datetime
) -> float | None:
    """Seconds from the GenerationRequested of the attempt whose result was just recorded
    to ``now``, or None when no result was recorded."""
    result_types = {GenerationSucceeded.type_name(), GenerationFailed.type_name()}
    result = next((item for item in recorded if item.envelope.type in result_types), None)
    if result is None:
        return None
    attempt_id = result.envelope.data.get("attempt_id")
    requested = next(
        (
            item
            for item in reversed(history)
            if item.envelope.type == GenerationRequested.type_name()
            and item.envelope.data.get("attempt_id") == attempt_id
        ),
        None,
    )
    if requested is None:
        return None
    return max(0.0, (now - requested.envelope.occurred_at).total_seconds())
