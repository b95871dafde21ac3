"""The work loop: one GenerationRequested in, GenerationStarted and a result out.

For each attempt taken from the work queue:

1. checks (:mod:`canvas_generator.checks`): an attempt past its lease, of a job this
   process heard cancelled, or that the orchestrator says is no longer current, is
   acked and dropped with an "attempt skipped" log line; nothing is published;
2. GenerationStarted is published, and the model is called while the broker confirms
   it (nothing else of the attempt is published before that confirm; one that never
   comes ends the call), in a task of its own that a cancel of the job aborts
   (:mod:`canvas_generator.cancellations`): an aborted attempt logs "attempt cancelled"
   and publishes nothing more;
3. while the reply streams in, each object is validated as soon as the model has
   written it and published as a GenerationProgressed (:mod:`canvas_generator.progress`),
   its index counting valid objects only, so that the indexes are the positions in the
   final set;
4. the result (GenerationSucceeded or GenerationFailed) is published, once every
   progress event before it is confirmed. A GenerationSucceeded carries exactly the
   objects that were progressed, in their order: a finished reply that reads otherwise
   than its stream fails the attempt (retryable), and so does a stream cut off midway,
   whatever it streamed before.

A work message is acked only after its result was confirmed by the broker. Each run of
an attempt has an id of its own (``run_id``, in every event it publishes) and runs in a
task of its own, apart from the delivery that started it:

- a connection blip (the broker closed the connection, a network hiccup) costs the
  delivery, not the run: the broker hands the attempt out again, and when it comes back
  to this process while the run is still going, the new delivery adopts the run (waits
  for it and is acked with it) instead of calling the model a second time;
- the run's publishes wait for the broker to come back (up to ``publish_retry_seconds``)
  rather than fail at the first refusal; a publish repeated after a refusal carries the
  same event id, which the orchestrator records once;
- when the attempt went to another process meanwhile, both run; the orchestrator counts
  only the newest run's progress and result (the other run is fenced off by its run id).

Priority: the orchestrator hands out the highest priority first. On a classic work
queue (AMQP_QUEUE_TYPE=classic, ``x-max-priority``) the broker also orders what it holds
by the priority each GenerationRequested is published with; a quorum queue hands out in
the order published. The consumer's prefetch is MAX_CONCURRENT_JOBS, and each message
is worked as soon as it is delivered, so a generator holds only the attempts it is
working on: at most MAX_CONCURRENT_JOBS messages per process are taken ahead of a
higher-priority one published after them. A larger prefetch would let more messages
wait inside the process, out of the order the queue hands them out in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import structlog
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import ACK, Broker, Consumer, Outcome
from canvas_events.envelope import Envelope, utcnow
from canvas_events.errors import PublishError
from canvas_events.events import (
    GenerationFailed,
    GenerationRequested,
    GenerationStarted,
    GenerationSucceeded,
    parse_event,
)
from canvas_events.publishing import BatchPublisher
from canvas_events.runtime import cancel_and_wait
from canvas_events.topology import GENERATOR
from canvas_generator.budget import FleetBudget
from canvas_generator.cancellations import Cancellations
from canvas_generator.checks import AttemptChecker, SkipReason, Verdict, lease_expired
from canvas_generator.client import Completion, ModelClient
from canvas_generator.errors import AttemptFailed, BadOutput, FailureKind, classify
from canvas_generator.metrics import Metrics
from canvas_generator.parsing import ObjectStream, ParsedReply, parse_reply
from canvas_generator.progress import Progress
from canvas_generator.prompt import build_messages

log = structlog.get_logger("canvas_generator.worker")
# How far the orchestrator's clock may run behind ours (see Worker._may_predate_control).
CLOCK_SKEW = timedelta(seconds=5)

Result = GenerationSucceeded | GenerationFailed


class Worker:
    """Takes attempts from the work queue and publishes what became of them."""

    def __init__(
        self,
        broker: Broker,
        client: ModelClient,
        *,
        generator_id: str,
        prefetch: int,
        cancellations: Cancellations | None = None,
        checker: AttemptChecker | None = None,
        budget: FleetBudget | None = None,
        clock: Callable[[], datetime] = utcnow,
        publish_retry_seconds: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._broker = broker
        # Results and progress of every attempt here: what waits together travels together.
        self._outbound = BatchPublisher(broker, GENERATOR)
        self._client = client
        self.generator_id = generator_id
        self.metrics = metrics if metrics is not None else Metrics()
        self._prefetch = prefetch
        self.cancellations = (
            cancellations
            if cancellations is not None
            else Cancellations(broker.topology, generator_id)
        )
        # None: no orchestrator to ask (the other checks still apply).
        self._checker = checker
        # None: no fleet budget is set; calls need no permit.
        self._budget = budget
        self._clock = clock
        self._publish_retry_seconds = publish_retry_seconds
        # The runs in this process, by attempt id: a delivery of an attempt that is
        # running here already adopts its run.
        self._runs: dict[UUID, asyncio.Task[None]] = {}

    @property
    def running(self) -> int:
        """Attempts running in this process now."""
        return len(self._runs)

    def consumer(self) -> Consumer:
        """The work queue's consumer: ``prefetch`` attempts at once, each in its own task
        (so prefetch = MAX_CONCURRENT_JOBS keeps the broker's priority order, see above)."""
        return Consumer(
            queue=self._broker.topology.generator_work,
            handler=self.handle,
            prefetch=self._prefetch,
        )

    async def handle(self, envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        """Run one attempt; raises (so the work is handed out again) if a publish fails."""
        event = parse_event(envelope)
        if not isinstance(event, GenerationRequested):
            # Only GenerationRequested is bound to the work queue; anything else is a
            # misrouted message that no generator can act on.
            log.warning("not a generation request; ignored", event_type=envelope.type)
            return ACK
        structlog.contextvars.bind_contextvars(attempt_id=str(event.attempt_id))
        try:
            run = self._runs.get(event.attempt_id)
            if run is not None:
                self.metrics.generations_adopted.inc()
                log.info("attempt handed out again while it runs here; adopting the run")
            elif await self._skipped(
                envelope.job_id, event, self._may_predate_control(envelope, message)
            ):
                return ACK
            else:
                run = self._start_run(envelope, event)
            # Shielded: this delivery may be lost with its channel (the broker then hands
            # the attempt out again), the run goes on and the next delivery adopts it.
            await asyncio.shield(run)
        finally:
            structlog.contextvars.unbind_contextvars("attempt_id")
        return ACK

    def _start_run(self, envelope: Envelope, event: GenerationRequested) -> asyncio.Task[None]:
        run = asyncio.create_task(self._run(envelope, event), name=f"run-{event.attempt_id}")
        self._runs[event.attempt_id] = run

        def forget(task: asyncio.Task[None]) -> None:
            if self._runs.get(event.attempt_id) is task:
                del self._runs[event.attempt_id]
            if not task.cancelled():
                task.exception()  # its deliveries raise it; retrieved even when none is left

        run.add_done_callback(forget)
        return run

    async def stop(self) -> None:
        """Cancel the runs still going once the broker has stopped: no delivery waits for
        them any more (theirs went with a connection, and the broker hands their
        attempts to another generator), and they could publish nothing."""
        await cancel_and_wait(*self._runs.values())

    def _may_predate_control(self, envelope: Envelope, message: AbstractIncomingMessage) -> bool:
        """Whether a cancel of this attempt's job may have been broadcast before this
        process's control queue existed: the attempt was dispatched before the queue was
        bound (allowing for clocks that differ a little), or it is a redelivery. Only then
        is the orchestrator asked; otherwise a cancel reaches the control queue, and the
        question would cost both services a round trip per attempt for nothing."""
        bound = self._broker.connected_at
        if message.redelivered or bound is None:
            return True
        return envelope.occurred_at < bound + CLOCK_SKEW

    async def _skipped(
        self, job_id: UUID | None, event: GenerationRequested, ask_orchestrator: bool = True
    ) -> bool:
        """Whether the attempt is not worth a model call (logged and counted if so)."""
        details: dict[str, Any] = {}
        reason: SkipReason | None = None
        if lease_expired(event.lease_expires_at, self._clock()):
            reason = SkipReason.LEASE_EXPIRED
            details["lease_expires_at"] = event.lease_expires_at.isoformat()
        elif job_id is not None and self.cancellations.is_cancelled(job_id):
            reason = SkipReason.CANCELLED
        elif job_id is not None and self._checker is not None and ask_orchestrator:
            check = await self._checker.check(job_id, event.attempt_id)
            if check.verdict is Verdict.NOT_CURRENT:
                reason = SkipReason.NOT_CURRENT
                details["status"] = check.status
            elif check.verdict is Verdict.UNKNOWN:
                log.warning("attempt check failed; proceeding", error=check.detail)
        if reason is None:
            return False
        self.metrics.generations_skipped.labels(reason=reason.value).inc()
        log.info("attempt skipped", reason=reason.value, attempt=event.attempt, **details)
        return True

    async def _run(self, envelope: Envelope, event: GenerationRequested) -> None:
        self.metrics.generations_in_flight.inc()
        started = time.perf_counter()
        outcome = "failed"
        run_id = uuid4()
        # Only a streamed reply has objects to show before it ends.
        progress = (
            Progress(self._publish, envelope, event.attempt_id, run_id, metrics=self.metrics)
            if self._client.stream
            else None
        )
        announced: asyncio.Task[None] | None = None
        try:
            if not await self._permitted(envelope, event, run_id):
                outcome = "cancelled"
                self.metrics.generations_cancelled.inc()
                log.info("attempt cancelled while it waited for model capacity")
                return
            # GenerationStarted goes out while the model is called: nothing else of the
            # attempt is published before the broker confirmed it (see _after_started).
            announced = asyncio.create_task(
                self._started(envelope, event, run_id), name=f"started-{event.attempt_id}"
            )
            if progress is not None:
                progress.after = announced
            # Again, as the call goes out: the budget counts calls when they are sent.
            if not await self._permitted(envelope, event, run_id):
                outcome = "cancelled"
                self.metrics.generations_cancelled.inc()
                return
            result = await self._after_started(announced, envelope.job_id, event, progress)
            if result is None:
                outcome = "cancelled"
                self.metrics.generations_cancelled.inc()
                # Nothing to publish: the job is cancelled, and the orchestrator would
                # ignore a result anyway.
                log.info("attempt cancelled", attempt=event.attempt)
                return
            await self._account(event, run_id, result)
            if progress is not None:
                # The result after every progress event of its attempt, also a failure's:
                # the job's history then reads in the order things happened.
                await progress.drain()
            await self._publish(envelope.follow(result.model_copy(update={"run_id": run_id})))
            outcome = "succeeded" if isinstance(result, GenerationSucceeded) else "failed"
        finally:
            if progress is not None:
                await progress.aclose()
            if announced is not None:
                await _stopped(announced)
            self.metrics.generations_in_flight.dec()
            self.metrics.generation_attempt_seconds.labels(outcome=outcome).observe(
                time.perf_counter() - started
            )

    async def _after_started(
        self,
        started: asyncio.Task[None],
        job_id: UUID | None,
        request: GenerationRequested,
        progress: Progress | None,
    ) -> Result | None:
        """:meth:`_attempt_unless_cancelled` while ``started`` publishes GenerationStarted,
        its result handed back only once that is confirmed. A GenerationStarted that
        cannot be published ends the call and raises its error (the work goes back to
        the queue), as it did when the call waited for it: the call's wait now overlaps
        the confirm's (under load 10-30 ms an attempt)."""
        attempt = asyncio.ensure_future(self._attempt_unless_cancelled(job_id, request, progress))
        try:
            await asyncio.wait({started, attempt}, return_when=asyncio.FIRST_EXCEPTION)
            if started.done() and not started.cancelled() and started.exception() is not None:
                await started  # raises its error; the call is cancelled below
            result = await attempt
            await started
            return result
        finally:
            await _stopped(attempt)

    async def _started(self, envelope: Envelope, event: GenerationRequested, run_id: UUID) -> None:
        """Publish that this run took the attempt."""
        await self._publish(
            envelope.follow(
                GenerationStarted(
                    attempt_id=event.attempt_id,
                    model=self._client.model,
                    generator_id=self.generator_id,
                    run_id=run_id,
                )
            )
        )
        log.info(
            "attempt started",
            attempt=event.attempt,
            run_id=str(run_id),
            model=self._client.model,
            generator_id=self.generator_id,
            lease_expires_at=event.lease_expires_at.isoformat(),
        )

    async def _permitted(
        self, envelope: Envelope, event: GenerationRequested, run_id: UUID
    ) -> bool:
        """Wait for the fleet's model budget to allow this run's call (at once without a
        budget); False when the job was cancelled meanwhile."""
        if self._budget is None:
            return True
        job_id = envelope.job_id
        waited = await self._budget.permit(
            event.attempt_id,
            run_id,
            prompt_chars=len(event.query),
            cancelled=lambda: job_id is not None and self.cancellations.is_cancelled(job_id),
        )
        self.metrics.budget_wait_seconds.observe(waited.seconds)
        if waited.reason is not None:
            log.info(
                "model capacity granted after a wait",
                waited_seconds=round(waited.seconds, 3),
                reason=waited.reason,
            )
        return waited.granted

    async def _account(self, event: GenerationRequested, run_id: UUID, result: Result) -> None:
        """Tell the fleet's budget what the call used, or that the model asked the fleet
        to wait (a 429 with Retry-After)."""
        if self._budget is None:
            return
        if isinstance(result, GenerationSucceeded):
            usage = result.usage
            tokens = usage.get("total_tokens") or (
                usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
            )
            await self._budget.report(event.attempt_id, run_id, tokens)
        elif result.kind == FailureKind.RATE_LIMITED.value and result.retry_after_seconds:
            await self._budget.pause(result.retry_after_seconds)

    async def _attempt_unless_cancelled(
        self, job_id: UUID | None, request: GenerationRequested, progress: Progress | None = None
    ) -> Result | None:
        """The attempt's result, or None when a cancel of its job came first or aborted
        its model call."""
        if job_id is None:
            return await self.attempt(request, progress)
        # No await between this check and track(): a cancel that arrives later finds the
        # task, one that came earlier is in the set (asyncio runs one thing at a time).
        if self.cancellations.is_cancelled(job_id):
            return None
        task = asyncio.create_task(
            self.attempt(request, progress), name=f"attempt-{request.attempt_id}"
        )
        with self.cancellations.track(job_id, task):
            try:
                return await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this handler itself is cancelled (shutdown), not the job
                return None

    async def attempt(
        self, request: GenerationRequested, progress: Progress | None = None
    ) -> Result:
        """Call the model and read its reply: the event that says how it went. With
        ``progress``, each object of a streamed reply is handed to it as soon as it is
        complete; raises :class:`PublishError` when one of them cannot be published."""
        began = time.perf_counter()
        try:
            completion, parsed = await self._drawing(request, progress)
        except PublishError:
            raise  # not the model's failure: the work goes back to the queue
        except Exception as exc:
            return self._failure(request, exc, began)
        return GenerationSucceeded(
            attempt_id=request.attempt_id,
            objects=parsed.objects,
            dropped_objects=parsed.dropped,
            model=completion.model,
            usage=completion.usage,
            latency_ms=completion.latency_ms,
        )

    async def _drawing(
        self, request: GenerationRequested, progress: Progress | None
    ) -> tuple[Completion, ParsedReply]:
        """The model's reply and the objects read from it; raises what went wrong."""
        messages = build_messages(request.query)
        reader = _Reader(progress, self.metrics) if progress is not None else None
        completion = await self._client.complete(
            messages, on_text=reader.feed if reader is not None else None
        )
        log.info(
            "openai call made",
            model=completion.model,
            latency_ms=completion.latency_ms,
            finish_reason=completion.finish_reason,
            streamed=reader is not None,
            first_object_ms=reader.first_object_ms if reader is not None else None,
            **completion.usage,
        )
        parsed = _parsed(completion, progress)
        self.metrics.generated_objects.labels(result="kept").inc(len(parsed.objects))
        self.metrics.generated_objects.labels(result="dropped").inc(parsed.dropped)
        log.info("objects parsed", count=len(parsed.objects), dropped=parsed.dropped)
        return completion, parsed

    def _failure(
        self, request: GenerationRequested, exc: Exception, began: float
    ) -> GenerationFailed:
        """The GenerationFailed for what ended the attempt, counted and logged."""
        failure = classify(exc)
        self.metrics.openai_errors.labels(kind=failure.kind.value).inc()
        log.warning(
            "attempt failed",
            # A failed call is an OpenAI call made too: say which model and how long.
            model=self._client.model,
            latency_ms=int((time.perf_counter() - began) * 1000),
            kind=failure.kind.value,
            retryable=failure.retryable,
            error=failure.message,
            retry_after_seconds=failure.retry_after_seconds,
            # A bug of ours deserves its traceback; the model's failures do not.
            exc_info=failure.kind is FailureKind.INTERNAL,
        )
        return _failed(request, failure)

    async def _publish(self, envelope: Envelope) -> None:
        """Publish with the broker's confirm; while the broker refuses (a connection
        blip), wait for it and publish the same envelope again, for up to
        ``publish_retry_seconds`` (then raise the :class:`PublishError`)."""
        deadline = time.monotonic() + self._publish_retry_seconds
        while True:
            try:
                await self._outbound.publish(envelope)
                return
            except PublishError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
            # Reconnected (or not, within the time left): try again either way.
            with contextlib.suppress(TimeoutError):
                await self._broker.wait_connected(min(left, 1.0))
            await asyncio.sleep(0.05)


class _Reader:
    """Finds the objects of a streamed reply as its text arrives and hands each to
    ``progress``."""

    def __init__(self, progress: Progress, metrics: Metrics) -> None:
        self._objects = ObjectStream()
        self._progress = progress
        self._metrics = metrics
        self._started = time.perf_counter()
        self.first_object_ms: int | None = None

    def feed(self, piece: str) -> None:
        for index, obj in self._objects.feed(piece):
            if self.first_object_ms is None:
                elapsed = time.perf_counter() - self._started
                self._metrics.first_object_seconds.observe(elapsed)
                self.first_object_ms = round(elapsed * 1000)
            self._progress.put(index, obj)


def _parsed(completion: Completion, progress: Progress | None) -> ParsedReply:
    """The objects of a finished reply; raises :class:`BadOutput` when there are none to
    read, or when they differ from those already streamed to clients."""
    try:
        parsed = parse_reply(completion.text)
    except BadOutput as exc:
        if completion.finish_reason == "length":
            raise BadOutput(f"{exc.message} (the reply was cut off at its length limit)") from exc
        raise
    if progress is not None and parsed.objects != progress.objects:
        # Clients were shown the streamed objects as this attempt's drawing; a result
        # that differs from them must not replace them unseen.
        raise BadOutput(
            f"the finished reply held {len(parsed.objects)} objects that differ from "
            f"the {len(progress.objects)} streamed from it"
        )
    return parsed


def _failed(request: GenerationRequested, failure: AttemptFailed) -> GenerationFailed:
    return GenerationFailed(
        attempt_id=request.attempt_id,
        error=failure.message,
        kind=failure.kind.value,
        retryable=failure.retryable,
        retry_after_seconds=failure.retry_after_seconds,
    )


async def _stopped(task: asyncio.Future[Any]) -> None:
    """``task`` cancelled unless it ended; its error, if any, retrieved (it was raised
    where it was awaited, or it no longer matters)."""
    if not task.done():
        await cancel_and_wait(task)  # type: ignore[arg-type]
    elif not task.cancelled():
        task.exception()
