"""The consumer of topology.orchestrator: requests from the gateway and results from
the generators become events in the job's stream.

One message is one transaction: the processed_messages row (so a redelivery changes
nothing), the stream read, the decision, the append and the read models. Messages of
one job are handled one at a time in delivery order within this process, and under the
job row's lock across processes; a writer that still lost the race (a new job's first
append) re-reads the stream and decides again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal
from uuid import UUID, uuid4

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import ACK, DeadLetter, Outcome, Retry
from canvas_events.envelope import Envelope, utcnow
from canvas_events.errors import PoisonMessage
from canvas_events.events import (
    Event,
    GenerationFailed,
    GenerationProgressed,
    GenerationRequested,
    GenerationStarted,
    GenerationSucceeded,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobRequested,
    JobRetryScheduled,
    parse_event,
)
from canvas_events.postgres import Database
from canvas_orchestrator import domain
from canvas_orchestrator.domain import JobState, Policy
from canvas_orchestrator.errors import ConcurrencyError, UnexpectedEvent
from canvas_orchestrator.event_store import RecordedEvent, append, load
from canvas_orchestrator.metrics import Metrics
from canvas_orchestrator.projections import project

log = structlog.get_logger("canvas_orchestrator.handlers")

CONSUMER: Final = "job-orchestrator"
# Namespace of the two-key advisory locks that serialise new jobs on one canvas.
CANVAS_LOCK_CLASS: Final = 0x63610002
MAX_CONFLICT_RETRIES: Final = 8
# Another writer was first; the message is fine, so decide again on a fresh read.
CONFLICTS: Final = (
    ConcurrencyError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
_COMMANDS = (
    JobRequested,
    JobCancelRequested,
    GenerationStarted,
    GenerationProgressed,
    GenerationSucceeded,
    GenerationFailed,
)

Clock = Callable[[], datetime]


@dataclass
class Handled:
    """What one message did."""

    outcome: Literal["recorded", "ignored", "duplicate"]
    recorded: list[RecordedEvent] = field(default_factory=list)
    reason: str = ""
    # Seconds from the attempt's GenerationRequested to its recorded result, if any.
    attempt_seconds: float | None = None


class KeyedLocks:
    """One FIFO asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[UUID, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: UUID) -> AsyncIterator[None]:
        """Hold ``key``'s lock for the duration of the block."""
        entry = self._locks.get(key)
        lock, users = entry if entry is not None else (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Handler:
    """Turns consumed events into recorded ones (the Broker handler of the orchestrator)."""

    def __init__(
        self,
        database: Database,
        policy: Policy,
        metrics: Metrics,
        *,
        clock: Clock = utcnow,
        new_id: Callable[[], UUID] = uuid4,
    ) -> None:
        self._database = database
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._new_id = new_id
        self._locks = KeyedLocks()

    async def handle(self, envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        """The :data:`canvas_events.broker.Handler` for topology.orchestrator."""
        return await self.handle_envelope(envelope)

    async def handle_envelope(self, envelope: Envelope) -> Outcome:
        """Record what ``envelope`` means for its job; say what to do with the message."""
        try:
            event = parse_event(envelope)
            job_id = _check(envelope, event)
        except (PoisonMessage, UnexpectedEvent) as exc:
            self._metrics.messages.labels(envelope.type, "dead_lettered").inc()
            return DeadLetter(str(exc))

        async with self._locks.hold(job_id):
            for _ in range(MAX_CONFLICT_RETRIES):
                try:
                    handled = await self._handle_once(envelope, event, job_id)
                    break
                except CONFLICTS as exc:
                    log.info("stream changed meanwhile; deciding again", reason=type(exc).__name__)
            else:
                self._metrics.messages.labels(envelope.type, "retried").inc()
                return Retry(f"stream {job_id} kept changing under {MAX_CONFLICT_RETRIES} tries")

        self._metrics.messages.labels(envelope.type, handled.outcome).inc()
        if handled.outcome == "duplicate":
            log.info("duplicate message ignored", message_id=str(envelope.event_id))
        elif handled.outcome == "ignored":
            log.info("message changed nothing", reason=handled.reason)
        report(handled, self._metrics)
        return ACK

    async def _handle_once(self, envelope: Envelope, event: Event, job_id: UUID) -> Handled:
        pool = self._database.pool
        async with pool.acquire() as conn, conn.transaction():
            first = await conn.fetchval(
                "INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING RETURNING true",
                CONSUMER,
                envelope.event_id,
            )
            if first is None:
                return Handled("duplicate")
            # Timers lock the row too: whoever is second sees the other's events.
            await conn.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            history = await load(conn, job_id)
            state = state_of(history, job_id)
            owner = history[0].envelope.user_id if history else envelope.user_id
            if isinstance(event, JobCancelRequested) and state.exists and envelope.user_id != owner:
                return Handled("ignored", reason="cancel from someone who does not own the job")
            canvas_available = True
            if isinstance(event, JobRequested) and not state.exists:
                canvas_available = await _canvas_available(conn, event.canvas_id, owner)
            now = self._clock()
            new = domain.decide(
                state,
                event,
                now=now,
                policy=self._policy,
                new_id=self._new_id,
                canvas_available=canvas_available,
            )
            if not new:
                return Handled("ignored", reason=domain.ignored_because(state, event))
            canvas_id = state.canvas_id if state.exists else getattr(event, "canvas_id", None)
            envelopes = []
            for item in new:
                # The recorded copy of the incoming event keeps the time it happened at its
                # source; what the orchestrator decides happened at the ``now`` it decided
                # with (so next_attempt_at - occurred_at is exactly the backoff).
                source = type(item) is type(event)
                followed = envelope.follow(
                    item,
                    job_id=job_id,
                    user_id=owner,
                    canvas_id=canvas_id,
                    occurred_at=envelope.occurred_at if source else now,
                )
                envelopes.append(followed)
            recorded = await append(conn, job_id, state.version, envelopes)
            await project(conn, recorded)
        return Handled(
            "recorded", recorded, attempt_seconds=attempt_seconds(history, recorded, now)
        )


def _check(envelope: Envelope, event: Event) -> UUID:
    """The job the message is about; raises when the message can never be handled."""
    if not isinstance(event, _COMMANDS):
        raise UnexpectedEvent(f"{envelope.type} is not a command for the orchestrator")
    if envelope.job_id is None:
        raise PoisonMessage(f"{envelope.type} without a job_id")
    if isinstance(event, JobRequested) and not envelope.user_id:
        raise PoisonMessage("JobRequested without a user_id")
    return envelope.job_id


async def _canvas_available(conn: asyncpg.Connection, canvas_id: str, user_id: str | None) -> bool:
    """Whether ``user_id`` may draw on ``canvas_id``: it is new, or it is theirs."""
    # Two first jobs on one new canvas by two users: the second waits and then sees the first.
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))", CANVAS_LOCK_CLASS, canvas_id
    )
    owner = await conn.fetchval("SELECT user_id FROM canvases WHERE id = $1", canvas_id)
    return owner is None or owner == user_id


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


def report(handled: Handled, metrics: Metrics) -> None:
    """One log line per recorded event, and the metrics they move (after commit)."""
    for item in handled.recorded:
        event = parse_event(item.envelope)
        status = domain.status_reached(event)
        if status is not None:
            metrics.jobs.labels(status.value).inc()
        _log_recorded(event, item.position)
    if handled.attempt_seconds is not None:
        succeeded = any(
            item.envelope.type == GenerationSucceeded.type_name() for item in handled.recorded
        )
        metrics.attempt_duration.labels("succeeded" if succeeded else "failed").observe(
            handled.attempt_seconds
        )


def _log_recorded(event: Event, position: int) -> None:
    match event:
        case JobRequested():
            log.info(
                "job requested",
                position=position,
                canvas_id=event.canvas_id,
                priority=event.priority,
                query_chars=len(event.query),
            )
        case JobQueued():
            log.info("job queued", position=position, retry_count=event.retry_count)
        case GenerationRequested():
            log.info(
                "attempt dispatched",
                position=position,
                attempt=event.attempt,
                attempt_id=str(event.attempt_id),
                lease_expires_at=event.lease_expires_at.isoformat(),
            )
        case GenerationStarted():
            log.info(
                "attempt started",
                position=position,
                attempt_id=str(event.attempt_id),
                generator_id=event.generator_id,
                model=event.model,
            )
        case GenerationProgressed():
            log.debug("attempt progressed", position=position, index=event.index)
        case GenerationSucceeded():
            log.info(
                "attempt succeeded",
                position=position,
                attempt_id=str(event.attempt_id),
                objects=len(event.objects),
                dropped_objects=event.dropped_objects,
            )
        case GenerationFailed():
            log.warning(
                "attempt failed",
                position=position,
                attempt_id=str(event.attempt_id),
                error=event.error,
                kind=event.kind,
                retryable=event.retryable,
            )
        case JobRetryScheduled():
            log.warning(
                "retry scheduled",
                position=position,
                retry_count=event.retry_count,
                next_attempt_at=event.next_attempt_at.isoformat(),
                error=event.error,
            )
        case JobCompleted():
            # Written to canvas_objects in the transaction that recorded JobCompleted.
            log.info(
                "objects saved",
                position=position,
                object_count=event.object_count,
                dropped_objects=event.dropped_objects,
            )
            log.info(
                "job completed",
                position=position,
                object_count=event.object_count,
                latency_ms=event.latency_ms,
            )
        case JobFailed():
            log.error(
                "job failed", position=position, error=event.error, retry_count=event.retry_count
            )
        case JobCancelRequested():
            log.info("cancel requested", position=position, reason=event.reason)
        case JobCancelled():
            log.info("job cancelled", position=position)
        case _:
            log.info("event recorded", position=position, type=event.type_name())


def state_of(history: Sequence[RecordedEvent], job_id: UUID) -> JobState:
    """The fold of a loaded stream."""
    return domain.fold(job_id, (parse_event(item.envelope) for item in history))
