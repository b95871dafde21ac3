"""The work loop: one GenerationRequested in, GenerationStarted and a result out.

A work message is acked only after its result was confirmed by the broker; if a
publish fails the handler raises (a ConnectionError), and the broker hands the work
out again. A second run of the same attempt is harmless: the orchestrator records an
attempt's result once.
"""

from __future__ import annotations

import time
from datetime import datetime

import structlog
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import ACK, Broker, Consumer, Outcome
from canvas_events.envelope import Envelope, utcnow
from canvas_events.events import (
    GenerationFailed,
    GenerationRequested,
    GenerationStarted,
    GenerationSucceeded,
    parse_event,
)
from canvas_events.topology import GENERATOR, routing_key
from canvas_generator.client import ModelClient
from canvas_generator.errors import AttemptFailed, BadOutput, FailureKind, classify
from canvas_generator.metrics import (
    GENERATED_OBJECTS,
    GENERATION_ATTEMPT_SECONDS,
    GENERATIONS_IN_FLIGHT,
    OPENAI_ERRORS,
)
from canvas_generator.parsing import parse_reply
from canvas_generator.prompt import build_messages

log = structlog.get_logger("canvas_generator.worker")

Result = GenerationSucceeded | GenerationFailed


class Worker:
    """Takes attempts from the work queue and publishes what became of them."""

    def __init__(
        self, broker: Broker, client: ModelClient, *, generator_id: str, prefetch: int
    ) -> None:
        self._broker = broker
        self._client = client
        self.generator_id = generator_id
        self._prefetch = prefetch

    def consumer(self) -> Consumer:
        """The work queue's consumer: ``prefetch`` attempts at once, each in its own task."""
        return Consumer(
            queue=self._broker.topology.generator_work,
            handler=self.handle,
            prefetch=self._prefetch,
        )

    async def handle(self, envelope: Envelope, _: AbstractIncomingMessage) -> Outcome:
        """Run one attempt; raises (so the work is handed out again) if a publish fails."""
        event = parse_event(envelope)
        if not isinstance(event, GenerationRequested):
            # Only GenerationRequested is bound to the work queue; anything else is a
            # misrouted message that no generator can act on.
            log.warning("not a generation request; ignored", event_type=envelope.type)
            return ACK
        structlog.contextvars.bind_contextvars(attempt_id=str(event.attempt_id))
        GENERATIONS_IN_FLIGHT.inc()
        started = time.perf_counter()
        outcome = "failed"
        try:
            await self._publish(
                envelope.follow(
                    GenerationStarted(
                        attempt_id=event.attempt_id,
                        model=self._client.model,
                        generator_id=self.generator_id,
                    )
                )
            )
            log.info(
                "attempt started",
                attempt=event.attempt,
                model=self._client.model,
                generator_id=self.generator_id,
                lease_expires_at=event.lease_expires_at.isoformat(),
                lease_expired=_expired(event.lease_expires_at),
            )
            result = await self.attempt(event)
            await self._publish(envelope.follow(result))
            outcome = "succeeded" if isinstance(result, GenerationSucceeded) else "failed"
        finally:
            GENERATIONS_IN_FLIGHT.dec()
            GENERATION_ATTEMPT_SECONDS.labels(outcome=outcome).observe(
                time.perf_counter() - started
            )
            structlog.contextvars.unbind_contextvars("attempt_id")
        return ACK

    async def attempt(self, request: GenerationRequested) -> Result:
        """Call the model and read its reply: the event that says how it went."""
        try:
            messages = build_messages(request.query)
            completion = await self._client.complete(messages)
            log.info(
                "openai call made",
                model=completion.model,
                latency_ms=completion.latency_ms,
                finish_reason=completion.finish_reason,
                **completion.usage,
            )
            try:
                parsed = parse_reply(completion.text)
            except BadOutput as exc:
                if completion.finish_reason == "length":
                    raise BadOutput(
                        f"{exc.message} (the reply was cut off at its length limit)"
                    ) from exc
                raise
            GENERATED_OBJECTS.labels(result="kept").inc(len(parsed.objects))
            GENERATED_OBJECTS.labels(result="dropped").inc(parsed.dropped)
            log.info("objects parsed", count=len(parsed.objects), dropped=parsed.dropped)
        except Exception as exc:
            failure = classify(exc)
            OPENAI_ERRORS.labels(kind=failure.kind.value).inc()
            log.warning(
                "attempt failed",
                kind=failure.kind.value,
                retryable=failure.retryable,
                error=failure.message,
                retry_after_seconds=failure.retry_after_seconds,
                # A bug of ours deserves its traceback; the model's failures do not.
                exc_info=failure.kind is FailureKind.INTERNAL,
            )
            return _failed(request, failure)
        return GenerationSucceeded(
            attempt_id=request.attempt_id,
            objects=parsed.objects,
            dropped_objects=parsed.dropped,
            model=completion.model,
            usage=completion.usage,
            latency_ms=completion.latency_ms,
        )

    async def _publish(self, envelope: Envelope) -> None:
        await self._broker.publish(envelope, routing_key(GENERATOR, envelope.type))


def _failed(request: GenerationRequested, failure: AttemptFailed) -> GenerationFailed:
    return GenerationFailed(
        attempt_id=request.attempt_id,
        error=failure.message,
        kind=failure.kind.value,
        retryable=failure.retryable,
        retry_after_seconds=failure.retry_after_seconds,
    )


def _expired(lease_expires_at: datetime) -> bool:
    # Still worth running: the orchestrator decides whether a late result counts.
    return lease_expires_at <= utcnow()
