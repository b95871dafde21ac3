"""The consumer of topology.orchestrator: requests from the gateway and results from
the generators become events in the job's stream.

Messages are recorded a transaction at a time by group commit (:mod:`batching`): what
arrives while a transaction runs waits, and the next one takes it all. In each
transaction (:mod:`committer`) every message is decided, in delivery order, on the state
its job's earlier messages left, with the cancel requested for its job applied first (a
cancel answered 202 wins over a start or a result), and the decisions are recorded in
one append. Idle, a transaction carries one message.

Reports: what a transaction recorded is logged and counted from the transaction's
side, once it committed, in each message's own context (its job_id, correlation_id
and span), not by the consumer that waited for it: that consumer may be gone by then
(cancelled when the broker connection dropped or the service stopped), and the events
it recorded were committed and relayed all the same.

Traces: each message's events are recorded in the trace of the message (its consume
span), and the relay publishes them in it. A transaction is a span of its own, the
child of its first message's span, linked to the others' (their jobs' traces show the
wait for it in their consume spans, and the link leads to it).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from uuid import UUID, uuid4

import structlog
from aio_pika.abc import AbstractIncomingMessage

from canvas_events import tracing
from canvas_events.broker import ACK, DeadLetter, Outcome, Retry, is_transient
from canvas_events.envelope import Envelope
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
    JobRequested,
    parse_event,
)
from canvas_orchestrator import domain
from canvas_orchestrator.batching import GroupCommit, KeptConflicting
from canvas_orchestrator.committer import CONFLICTS, Committer, Stream, Transaction
from canvas_orchestrator.dispatch import Dispatcher, fast_slots
from canvas_orchestrator.domain import JobState, Policy
from canvas_orchestrator.errors import UnexpectedEvent
from canvas_orchestrator.metrics import Metrics
from canvas_orchestrator.reporting import Handled, attempt_seconds, report_message
from canvas_store import cancels

log = structlog.get_logger("canvas_orchestrator.handlers")

# Messages in one transaction, at most.
MAX_BATCH: Final = 100
# Messages before which a cancel requested for their job is applied: whatever starts or
# ends an attempt (and a cancel, so that its request is done with).
_MEETS_CANCELS = (GenerationStarted, GenerationSucceeded, GenerationFailed, JobCancelRequested)
_COMMANDS = (
    JobRequested,
    JobCancelRequested,
    GenerationStarted,
    GenerationProgressed,
    GenerationSucceeded,
    GenerationFailed,
)


@dataclass(frozen=True)
class _Message:
    """A consumed message, checked: the job it is about and its event."""

    job_id: UUID
    envelope: Envelope
    event: Event
    # The span that consumed it: the trace its decisions are recorded in.
    traceparent: str | None
    # Its consumer's context (log fields, span): what it did is reported in it.
    context: contextvars.Context


@dataclass(frozen=True)
class CancelRequest:
    """A cancel requested for a job and not applied yet (``cancel_requests``)."""

    envelope: Envelope
    # In cancel_requests already (the gateway's, or kept by an earlier batch), or new.
    stored: bool = True

    @property
    def event(self) -> JobCancelRequested:
        event = parse_event(self.envelope)
        if not isinstance(event, JobCancelRequested):
            raise PoisonMessage(f"a cancel request holds a {self.envelope.type}")
        return event


def _described(batch: Sequence[_Message]) -> dict[str, Any]:
    """The log fields of a batch's own lines: its job's job_id and correlation_id when
    it is one job's, else its job ids (the first 20) and how many messages it holds."""
    jobs: dict[UUID, str] = {}
    for message in batch:
        jobs.setdefault(message.job_id, message.envelope.correlation_id)
    if len(jobs) == 1:
        [(job_id, correlation_id)] = jobs.items()
        return {"job_id": str(job_id), "correlation_id": correlation_id}
    return {"job_ids": [str(job_id) for job_id in list(jobs)[:20]], "messages": len(batch)}


class Handler:
    """Turns consumed events into recorded ones (the Broker handler of the orchestrator)."""

    def __init__(
        self,
        committer: Committer,
        policy: Policy,
        metrics: Metrics,
        *,
        new_id: Callable[[], UUID] = uuid4,
        max_batch: int = MAX_BATCH,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self._policy = policy
        # Fair dispatch: a new job is dispatched at once only while the fleet has room
        # and no job awaits dispatch, else left to the dispatcher (None: always at once).
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._new_id = new_id
        self.committer = committer
        self._batches: GroupCommit[_Message, Handled] = GroupCommit(
            self._handle_batch,
            key=lambda message: message.job_id,
            conflicts=CONFLICTS,
            is_outage=is_transient,
            max_batch=max_batch,
            name="orchestrator-committer",
            describe=_described,
        )

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
        try:
            traceparent = tracing.current_traceparent()
            message = _Message(job_id, envelope, event, traceparent, contextvars.copy_context())
            # Logged and counted by the transaction once it committed (see _report).
            await self._batches.submit(message)
        except KeptConflicting as exc:
            self._metrics.messages.labels(envelope.type, "retried").inc()
            return Retry(str(exc))
        return ACK

    async def _handle_batch(self, batch: Sequence[_Message]) -> list[Handled]:
        """Decide on each message of ``batch`` in order, each on the state its job's
        earlier messages left, and record what they decided, in one transaction."""
        job_ids = sorted({message.job_id for message in batch})
        with tracing.span(
            "transaction",
            parent=batch[0].traceparent,
            root=True,
            links=[message.traceparent for message in batch[1:]],
            attributes={
                "db.system.name": "postgresql",
                "canvas.messages": len(batch),
                "canvas.jobs": len(job_ids),
                "canvas.job_id": str(batch[0].job_id) if len(job_ids) == 1 else None,
            },
        ):
            results = await self._record(batch, job_ids)
        self._report(batch, results)
        return results

    def _report(self, batch: Sequence[_Message], results: list[Handled]) -> None:
        """Log and count what each message of a committed batch did, exactly once, in
        its own context: here and not in its consumer, which may have been cancelled
        while it waited. Soon rather than now: the next transaction need not wait for
        the lines (they come before any consumer of this batch resumes)."""
        loop = asyncio.get_running_loop()
        for message, handled in zip(batch, results, strict=True):
            loop.call_soon(
                report_message, message.envelope, handled, self._metrics, context=message.context
            )

    async def _record(self, batch: Sequence[_Message], job_ids: list[UUID]) -> list[Handled]:
        async with self.committer.transaction() as tx:
            fresh = await tx.lock(
                job_ids,
                messages=[m.envelope.event_id for m in batch],
                canvases=[m.event.canvas_id for m in batch if isinstance(m.event, JobRequested)],
            )
            if not fresh:
                return [Handled("duplicate") for _ in batch]
            requests = await self._requests(tx, batch)
            streams = await tx.load(job_ids)
            # The canvases of the batch's new jobs, locked together.
            await tx.lock_canvases(
                m.event.canvas_id
                for m in batch
                if isinstance(m.event, JobRequested) and not streams[m.job_id].state.exists
            )
            await self._open_fast_path(tx, batch, streams)
            results, spans = await self._decide_all(tx, batch, streams, requests, fresh)
            await _settle_requests(tx, requests, streams)
        self._metrics.batch_messages.observe(len(batch))
        if self._dispatcher is not None and any(
            stream.state.awaiting_dispatch for stream in tx.changed.values()
        ):
            self._dispatcher.wake()
        return _shares(results, spans, streams, tx.now)

    async def _open_fast_path(
        self, tx: Transaction, batch: Sequence[_Message], streams: dict[UUID, Stream]
    ) -> None:
        """With fair dispatch, how many of the batch's new jobs may be dispatched at
        once (asked only when the batch holds one)."""
        if self._dispatcher is not None and any(
            isinstance(m.event, JobRequested) and not streams[m.job_id].state.exists for m in batch
        ):
            tx.dispatch_slots = await fast_slots(tx, self._dispatcher.limits)

    async def _requests(
        self, tx: Transaction, batch: Sequence[_Message]
    ) -> dict[UUID, CancelRequest]:
        """The cancels requested for the batch's jobs, read once their locks are held:
        those of new jobs (read with their recording locks), and those of jobs that a
        message of the batch starts or ends an attempt of."""
        requests = {job_id: CancelRequest(env) for job_id, env in tx.new_job_cancels.items()}
        asking = {m.job_id for m in batch if isinstance(m.event, _MEETS_CANCELS)}
        asking = {job_id for job_id in asking if tx.is_recorded(job_id)} - set(requests)
        if asking:
            pending = await cancels.pending(tx.conn, sorted(asking))
            requests |= {job_id: CancelRequest(env) for job_id, env in pending.items()}
        return requests

    async def _decide_all(
        self,
        tx: Transaction,
        batch: Sequence[_Message],
        streams: dict[UUID, Stream],
        requests: dict[UUID, CancelRequest],
        fresh: set[UUID],
    ) -> tuple[list[Handled], dict[UUID, list[tuple[int, int]]]]:
        """Each message's outcome, and per job the (message index, events staged) of the
        messages that recorded something, in order."""
        results: list[Handled] = []
        spans: dict[UUID, list[tuple[int, int]]] = {}
        # New canvases claimed by this batch's first jobs, not in the table yet.
        claimed: dict[str, str] = {}
        for message in batch:
            envelope, event = message.envelope, message.event
            if envelope.event_id not in fresh:
                results.append(Handled("duplicate"))
                continue
            fresh.discard(envelope.event_id)  # the same message twice in one batch
            stream = streams[message.job_id]
            if isinstance(event, JobCancelRequested) and not stream.state.exists:
                # Its request is not recorded yet (another replica has it in hand, or it
                # still waits in the queue): the cancel waits for it.
                requests.setdefault(message.job_id, CancelRequest(envelope, stored=False))
                results.append(Handled("kept"))
                continue
            request = requests.get(message.job_id)
            handled, made = await self._decide_with_requests(
                tx, stream, envelope, event, request, claimed
            )
            results.append(handled)
            before = len(stream.staged)
            for decided, cause in made:
                tx.stage(stream, [decided], cause, message.traceparent)
            if made:
                spans.setdefault(message.job_id, []).append(
                    (len(results) - 1, len(stream.staged) - before)
                )
        return results, spans

    async def _decide_with_requests(
        self,
        tx: Transaction,
        job: Stream,
        envelope: Envelope,
        event: Event,
        request: CancelRequest | None,
        claimed: dict[str, str],
    ) -> tuple[Handled, list[tuple[Event, Envelope]]]:
        """What one message decides, with the cancel requested for its job (if any)
        applied first: before a start or a result it cancels the job (the message then
        changes nothing), with a new job's request it records the job cancelled. Each new
        event comes with the envelope it follows: the message's, or the request's."""
        if request is not None and request.envelope.user_id != (job.owner or envelope.user_id):
            # Inside the transaction: not in the message's own log context.
            log.warning(
                "a cancel requested by someone who does not own the job ignored",
                job_id=str(job.job_id),
                correlation_id=request.envelope.correlation_id,
            )
            request = None
        made: list[tuple[Event, Envelope]] = []
        state = job.state
        if request is not None and isinstance(event, _MEETS_CANCELS) and state.exists:
            for decided in domain.cancel(state, request.event):
                made.append((decided, request.envelope))
                state = domain.evolve(state, decided)
        first = request.event if request is not None and isinstance(event, JobRequested) else None
        handled, new = await self._decide(tx, state, job.owner, envelope, event, claimed, first)
        for decided in new:
            from_request = first is not None and isinstance(
                decided, JobCancelRequested | JobCancelled
            )
            made.append((decided, request.envelope if from_request and request else envelope))
        if made and not new:
            handled = Handled("recorded")  # the cancel it met was recorded
        return handled, made

    async def _decide(
        self,
        tx: Transaction,
        state: JobState,
        owner: str | None,
        envelope: Envelope,
        event: Event,
        claimed: dict[str, str],
        cancelled_first: JobCancelRequested | None = None,
    ) -> tuple[Handled, list[Event]]:
        """What one message decides on its job's state: its outcome so far and its new
        events."""
        owner = owner if owner is not None else envelope.user_id
        if isinstance(event, JobCancelRequested) and state.exists and envelope.user_id != owner:
            return Handled("ignored", reason="cancel from someone who does not own the job"), []
        canvas_available = True
        if isinstance(event, JobRequested) and not state.exists:
            if event.canvas_id in claimed:
                canvas_available = claimed[event.canvas_id] == owner
            else:
                canvas_available = await tx.canvas_available(event.canvas_id, owner)
        dispatch_now = tx.dispatch_slots is None or tx.dispatch_slots > 0
        new = domain.decide(
            state,
            event,
            now=tx.now,
            policy=self._policy,
            new_id=self._new_id,
            canvas_available=canvas_available,
            cancelled_first=cancelled_first,
            dispatch_now=dispatch_now,
        )
        if tx.dispatch_slots is not None and any(isinstance(e, GenerationRequested) for e in new):
            tx.dispatch_slots -= 1
        if not new:
            return Handled("ignored", reason=domain.ignored_because(state, event)), []
        if isinstance(event, JobRequested) and canvas_available and owner is not None:
            claimed.setdefault(event.canvas_id, owner)
        return Handled("recorded"), new


async def _settle_requests(
    tx: Transaction, requests: dict[UUID, CancelRequest], streams: dict[UUID, Stream]
) -> None:
    """Keep the cancels this batch received for jobs still unrecorded; drop the stored
    requests of jobs that are final now (cancelled, or ended before: nothing to do)."""
    await cancels.keep(
        tx.conn,
        [
            (job_id, request.envelope)
            for job_id, request in requests.items()
            if not request.stored and not streams[job_id].state.exists
        ],
    )
    await cancels.clear(
        tx.conn,
        [
            job_id
            for job_id, request in requests.items()
            if request.stored and streams[job_id].state.is_final
        ],
    )


def _shares(
    results: list[Handled],
    spans: dict[UUID, list[tuple[int, int]]],
    streams: dict[UUID, Stream],
    now: datetime,
) -> list[Handled]:
    """Each message's share of its job's recorded events (after the commit)."""
    for job_id, parts in spans.items():
        stream = streams[job_id]
        so_far = list(stream.history)
        start = 0
        for index, count in parts:
            part = stream.recorded[start : start + count]
            start += count
            results[index] = Handled(
                "recorded", part, attempt_seconds=attempt_seconds(so_far, part, now)
            )
            so_far.extend(part)
    return results


def _check(envelope: Envelope, event: Event) -> UUID:
    """The job the message is about; raises when the message can never be handled."""
    if not isinstance(event, _COMMANDS):
        raise UnexpectedEvent(f"{envelope.type} is not a command for the orchestrator")
    if envelope.job_id is None:
        raise PoisonMessage(f"{envelope.type} without a job_id")
    if isinstance(event, JobRequested) and not envelope.user_id:
        raise PoisonMessage("JobRequested without a user_id")
    return envelope.job_id
