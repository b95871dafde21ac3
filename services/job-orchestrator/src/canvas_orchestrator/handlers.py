"""The consumer of topology.orchestrator: requests from the gateway and results from
the generators become events in the job's stream.

Messages are recorded by one task of this process, a transaction at a time; what
arrives while a transaction runs waits, and the next one takes it all (group commit):
the processed_messages rows (so a redelivery changes nothing), the job rows' locks
(across processes, in id order; a job not recorded yet has a lock of its own, taken
before it is looked for again, so that two replicas recording it, or one its request
and the other its cancel, take turns), the cancels requested for them (applied before
a start or a result, so that a cancel answered 202 wins), the streams (read again only
when a jobs row's version says another writer moved it since this process last
recorded it), a decision per message on the state its job's earlier messages left, in
delivery order, the read models, and one append for every stream. Every append holds
the lock that keeps positions in commit order until it commits, so one append for many
jobs is what lets the store keep up under load; idle, a transaction carries one
message. A writer that still lost the race (a new job's first append) re-reads and
decides again; a batch that fails for any other reason than the database is split, a
job and then a message at a time, so that only the message at fault goes to retries.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal
from uuid import UUID, uuid4

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage

from canvas_events.broker import ACK, DeadLetter, Outcome, Retry, is_transient
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
from canvas_events.postgres import JOB_RECORDING_LOCK_CLASS, Database
from canvas_orchestrator import domain
from canvas_orchestrator.domain import JobState, Policy
from canvas_orchestrator.errors import ConcurrencyError, UnexpectedEvent
from canvas_orchestrator.event_store import Append, RecordedEvent, append_streams, load_streams
from canvas_orchestrator.metrics import Metrics
from canvas_orchestrator.projections import project

log = structlog.get_logger("canvas_orchestrator.handlers")

CONSUMER: Final = "job-orchestrator"
# Namespace of the two-key advisory locks that serialise new jobs on one canvas.
CANVAS_LOCK_CLASS: Final = 0x63610002
MAX_CONFLICT_RETRIES: Final = 8
# Messages of one job in one transaction, at most.
MAX_BATCH: Final = 100
# Running jobs whose state is kept between messages, at most.
KNOWN_JOBS: Final = 2_000
# Another writer was first; the message is fine, so decide again on a fresh read.
CONFLICTS: Final = (
    ConcurrencyError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
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

Clock = Callable[[], datetime]


@dataclass
class Handled:
    """What one message did."""

    outcome: Literal["recorded", "ignored", "duplicate", "kept"]
    recorded: list[RecordedEvent] = field(default_factory=list)
    reason: str = ""
    # Seconds from the attempt's GenerationRequested to its recorded result, if any.
    attempt_seconds: float | None = None


@dataclass
class _Waiting:
    """A consumed message waiting for the next transaction."""

    job_id: UUID
    envelope: Envelope
    event: Event
    done: asyncio.Future[Handled]


@dataclass
class _Job:
    """One job within a transaction: its state as its messages are decided in turn."""

    state: JobState
    history: list[RecordedEvent]
    owner: str | None
    base_version: int
    envelopes: list[Envelope] = field(default_factory=list)
    # (index in the batch, how many of ``envelopes`` that message added), in order.
    spans: list[tuple[int, int]] = field(default_factory=list)


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


class _KeptChanging(Exception):
    """A job's stream changed under every try."""


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
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._database = database
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._new_id = new_id
        self._max_batch = max_batch
        # Messages waiting for a transaction, in delivery order, and the task that runs
        # the transactions one after another. (Several side by side, each for its share
        # of the jobs, measured slower: smaller batches cost more per message.)
        self._waiting: list[_Waiting] = []
        self._committer: asyncio.Task[None] | None = None
        # The state and stream of the jobs this process recorded last, newest last.
        self._known: OrderedDict[UUID, tuple[JobState, list[RecordedEvent]]] = OrderedDict()

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
            handled = await self._submit(job_id, envelope, event)
        except _KeptChanging as exc:
            self._metrics.messages.labels(envelope.type, "retried").inc()
            return Retry(str(exc))

        # Logged and counted here, in this message's own log context.
        self._metrics.messages.labels(envelope.type, handled.outcome).inc()
        if handled.outcome == "duplicate":
            log.info("duplicate message ignored", message_id=str(envelope.event_id))
        elif handled.outcome == "ignored":
            log.info("message changed nothing", reason=handled.reason)
        elif handled.outcome == "kept":
            log.info("cancel kept until its job is recorded")
        report(handled, self._metrics)
        return ACK

    async def _submit(self, job_id: UUID, envelope: Envelope, event: Event) -> Handled:
        """Queue the message for the next transaction and wait for its outcome."""
        done: asyncio.Future[Handled] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(job_id, envelope, event, done))
        if self._committer is None:
            # A context of its own: the committer serves many messages, each logged by
            # its own handler with its own correlation_id.
            self._committer = asyncio.create_task(
                self._work(), name="orchestrator-committer", context=contextvars.Context()
            )
        return await done

    def _take(self) -> list[_Waiting]:
        # A handler cancelled meanwhile (shutdown) leaves its message unacked: redelivered.
        waiting = [item for item in self._waiting if not item.done.done()]
        batch, self._waiting = waiting[: self._max_batch], waiting[self._max_batch :]
        return batch

    async def _work(self) -> None:
        try:
            # No await between the last empty take and leaving: a message queued after it
            # finds no committer and starts one.
            while batch := self._take():
                try:
                    await self._run(batch)
                except Exception as exc:  # a bug: no handler may wait for ever
                    log.exception("orchestrator committer failed")
                    _settle_all(batch, exc)
                except BaseException:
                    for item in batch:
                        item.done.cancel()
                    raise
        finally:
            self._committer = None

    async def _run(self, batch: list[_Waiting]) -> None:
        """One transaction for ``batch``; every message's future gets its outcome."""
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                results = await self._handle_batch(batch)
                break
            except CONFLICTS as exc:
                log.info("a stream changed meanwhile; deciding again", reason=type(exc).__name__)
            except Exception as exc:
                if is_transient(exc):
                    # The database is away: every message waits for it, none is at fault.
                    _settle_all(batch, exc)
                    return
                if len(batch) == 1:
                    _settle_all(batch, exc)
                    return
                # Not the database's fault: find the message at fault (a job at a time,
                # then a message at a time), so that only it goes to retries.
                log.warning("batch failed; handling its messages apart", error=repr(exc))
                for part in _split(batch):
                    await self._run(part)
                return
        else:
            jobs = {item.job_id for item in batch}
            if len(jobs) > 1:
                # Only the messages of the job whose stream keeps moving go to retries.
                for part in _split(batch):
                    await self._run(part)
                return
            message = f"stream {jobs.pop()} kept changing under {MAX_CONFLICT_RETRIES} tries"
            _settle_all(batch, _KeptChanging(message))
            return
        self._metrics.batch_messages.observe(len(batch))
        for item, handled in zip(batch, results, strict=True):
            if not item.done.done():
                item.done.set_result(handled)

    async def _handle_batch(self, batch: Sequence[_Waiting]) -> list[Handled]:
        """Decide on each message of ``batch`` in order (each on the state its job's
        earlier messages left), and record what they decided in one append, all in one
        transaction."""
        job_ids = sorted({item.job_id for item in batch})
        pool = self._database.pool
        async with pool.acquire() as conn, conn.transaction():
            # The processed_messages rows (a redelivery changes nothing) and the job rows'
            # locks (timers lock them too: whoever is second sees the other's events;
            # taken in id order, as every batch does), in one round trip. A jobs row's
            # version is its stream's (projected in every append's transaction): when it
            # is the version this process last recorded, the stream is not read again.
            rows = await conn.fetch(
                """
                WITH fresh AS (
                    INSERT INTO processed_messages (consumer, message_id)
                    SELECT $1, m FROM unnest($2::uuid[]) AS m
                    ON CONFLICT DO NOTHING RETURNING message_id
                ), locked AS (
                    SELECT id, version FROM jobs WHERE id = ANY($3::uuid[])
                    ORDER BY id FOR UPDATE
                )
                SELECT message_id AS id, NULL::int AS version FROM fresh
                UNION ALL
                SELECT id, version FROM locked
                """,
                CONSUMER,
                [item.envelope.event_id for item in batch],
                job_ids,
            )
            fresh = {row["id"] for row in rows if row["version"] is None}
            if not fresh:
                return [Handled("duplicate") for _ in batch]
            versions = {row["id"]: row["version"] for row in rows if row["version"] is not None}
            # The cancels requested for the batch's jobs, read once their locks are held:
            # the gateway writes a request under a share lock of the job's row (or its
            # recording lock, before it has one), so none written before is missed.
            requests: dict[UUID, CancelRequest] = {}
            missing = [job_id for job_id in job_ids if job_id not in versions]
            if missing:
                await _lock_new_jobs(conn, missing, versions, requests)
            if asking := sorted(
                {item.job_id for item in batch if isinstance(item.event, _MEETS_CANCELS)}
                - set(missing)
            ):
                requests |= await cancel_requests(conn, asking)
            jobs = await self._jobs(conn, job_ids, versions)
            results: list[Handled] = []
            # New canvases claimed by this batch's first jobs, not in the table yet.
            claimed: dict[str, str] = {}
            now = self._clock()
            for item in batch:
                envelope, event = item.envelope, item.event
                if envelope.event_id not in fresh:
                    results.append(Handled("duplicate"))
                    continue
                fresh.discard(envelope.event_id)  # the same message twice in one batch
                job = jobs[item.job_id]
                if isinstance(event, JobCancelRequested) and not job.state.exists:
                    # Its request is not recorded yet (another replica has it in hand, or
                    # it still waits in the queue): the cancel waits for it.
                    requests.setdefault(item.job_id, CancelRequest(envelope, stored=False))
                    results.append(Handled("kept"))
                    continue
                handled, made = await self._decide_with_requests(
                    conn, job, envelope, event, requests.get(item.job_id), now, claimed
                )
                results.append(handled)
                if not made:
                    continue
                if job.owner is None:
                    job.owner = envelope.user_id
                state = job.state
                canvas_id = state.canvas_id if state.exists else getattr(event, "canvas_id", None)
                job.spans.append((len(results) - 1, len(made)))
                for decided, cause in made:
                    # The recorded copy of an incoming event keeps the time it happened at
                    # its source; what the orchestrator decides happened at the ``now`` it
                    # decided with (so next_attempt_at - occurred_at is exactly the backoff).
                    source = decided.type_name() == cause.type
                    job.envelopes.append(
                        cause.follow(
                            decided,
                            job_id=item.job_id,
                            user_id=job.owner,
                            canvas_id=canvas_id,
                            occurred_at=cause.occurred_at if source else now,
                        )
                    )
                    state = domain.evolve(state, decided)
                job.state = state
            await _settle_requests(conn, requests, jobs)
            # Recorded in the order the jobs' first messages came (which is the order
            # they were decided in), so that positions tell the same story: the first job
            # on a new canvas is the one that owns it, on replay too.
            changed = [
                job_id
                for job_id in dict.fromkeys(item.job_id for item in batch)
                if jobs[job_id].envelopes
            ]
            # Read models first: every append waits for the one before it to commit (the
            # position lock), so only the append itself and the commit are spent there.
            for job_id in changed:
                job = jobs[job_id]
                await project(conn, _unpositioned(job_id, job.base_version, job.envelopes, now))
            recorded = await append_streams(
                conn,
                [
                    Append(job_id, jobs[job_id].base_version, jobs[job_id].envelopes)
                    for job_id in changed
                ],
                position_job=True,
            )
        # Each job's share of the append, and each message's share of its job's.
        offset = 0
        for job_id in changed:
            job = jobs[job_id]
            mine = recorded[offset : offset + len(job.envelopes)]
            offset += len(job.envelopes)
            self._remember(job_id, job.state, [*job.history, *mine])
            so_far = list(job.history)
            start = 0
            for index, count in job.spans:
                part = mine[start : start + count]
                start += count
                results[index] = Handled(
                    "recorded", part, attempt_seconds=attempt_seconds(so_far, part, now)
                )
                so_far.extend(part)
        return results

    async def _jobs(
        self, conn: asyncpg.Connection, job_ids: Sequence[UUID], versions: dict[UUID, int]
    ) -> dict[UUID, _Job]:
        """Each job's state and stream: as this process recorded it last when the jobs
        row says nothing moved since, else read (in one query for all)."""
        found: dict[UUID, tuple[JobState, list[RecordedEvent]]] = {}
        for job_id in job_ids:
            known = self._known.get(job_id)
            version = versions.get(job_id)
            if known is not None and version is not None and known[0].version == version:
                found[job_id] = known
        streams = await load_streams(conn, [job_id for job_id in job_ids if job_id not in found])
        for job_id, history in streams.items():
            found[job_id] = (state_of(history, job_id), history)
        return {
            job_id: _Job(
                state=state,
                history=history,
                owner=history[0].envelope.user_id if history else None,
                base_version=state.version,
            )
            for job_id, (state, history) in found.items()
        }

    def _remember(self, job_id: UUID, state: JobState, history: list[RecordedEvent]) -> None:
        """Keep a running job's state and stream (as committed) for its next message."""
        if state.is_final:
            self._known.pop(job_id, None)
            return
        self._known[job_id] = (state, history)
        self._known.move_to_end(job_id)
        while len(self._known) > KNOWN_JOBS:
            self._known.popitem(last=False)

    async def _decide_with_requests(
        self,
        conn: asyncpg.Connection,
        job: _Job,
        envelope: Envelope,
        event: Event,
        request: CancelRequest | None,
        now: datetime,
        claimed: dict[str, str],
    ) -> tuple[Handled, list[tuple[Event, Envelope]]]:
        """What one message decides, with the cancel requested for its job (if any)
        applied first: before a start or a result it cancels the job (the message then
        changes nothing), with a new job's request it records the job cancelled. Each new
        event comes with the envelope it follows: the message's, or the request's."""
        if request is not None and request.envelope.user_id != (job.owner or envelope.user_id):
            log.warning("a cancel requested by someone who does not own the job ignored")
            request = None
        made: list[tuple[Event, Envelope]] = []
        state = job.state
        if request is not None and isinstance(event, _MEETS_CANCELS) and state.exists:
            for decided in domain.cancel(state, request.event):
                made.append((decided, request.envelope))
                state = domain.evolve(state, decided)
        first = request.event if request is not None and isinstance(event, JobRequested) else None
        handled, new = await self._decide(
            conn, state, job.owner, envelope, event, now, claimed, first
        )
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
        conn: asyncpg.Connection,
        state: JobState,
        owner: str | None,
        envelope: Envelope,
        event: Event,
        now: datetime,
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
                canvas_available = await _canvas_available(conn, event.canvas_id, owner)
        new = domain.decide(
            state,
            event,
            now=now,
            policy=self._policy,
            new_id=self._new_id,
            canvas_available=canvas_available,
            cancelled_first=cancelled_first,
        )
        if not new:
            return Handled("ignored", reason=domain.ignored_because(state, event)), []
        if isinstance(event, JobRequested) and canvas_available and owner is not None:
            claimed.setdefault(event.canvas_id, owner)
        return Handled("recorded"), new


async def _lock_new_jobs(
    conn: asyncpg.Connection,
    job_ids: Sequence[UUID],
    versions: dict[UUID, int],
    requests: dict[UUID, CancelRequest],
) -> None:
    """Take the recording lock of each job that had no row (in id order, as every batch
    does), then look again: another replica may have recorded one while this transaction
    waited. Adds the rows found to ``versions``, and the cancels requested for any of them
    to ``requests``."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(id::text)) FROM unnest($2::uuid[]) AS id",
        JOB_RECORDING_LOCK_CLASS,
        job_ids,
    )
    rows = await conn.fetch(
        """
        WITH locked AS (
            SELECT id, version FROM jobs WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
        )
        SELECT id, version, NULL::jsonb AS request FROM locked
        UNION ALL
        SELECT job_id, NULL, envelope FROM cancel_requests WHERE job_id = ANY($1::uuid[])
        """,
        job_ids,
    )
    for row in rows:
        if row["version"] is not None:
            versions[row["id"]] = row["version"]
        else:
            requests[row["id"]] = CancelRequest(Envelope.model_validate(row["request"]))


async def cancel_requests(
    conn: asyncpg.Connection, job_ids: Sequence[UUID]
) -> dict[UUID, CancelRequest]:
    """The cancels requested and not applied yet for ``job_ids`` (locked by the caller)."""
    rows = await conn.fetch(
        "SELECT job_id, envelope FROM cancel_requests WHERE job_id = ANY($1::uuid[])",
        list(job_ids),
    )
    return {row["job_id"]: CancelRequest(Envelope.model_validate(row["envelope"])) for row in rows}


async def _settle_requests(
    conn: asyncpg.Connection, requests: dict[UUID, CancelRequest], jobs: dict[UUID, _Job]
) -> None:
    """Keep the cancels this batch received for jobs still unrecorded; drop the stored
    requests of jobs that are final now (cancelled, or ended before: nothing to do)."""
    kept = [
        (job_id, request.envelope)
        for job_id, request in requests.items()
        if not request.stored and not jobs[job_id].state.exists
    ]
    if kept:
        await conn.execute(
            "INSERT INTO cancel_requests (job_id, envelope) "
            "SELECT * FROM unnest($1::uuid[], $2::jsonb[]) ON CONFLICT (job_id) DO NOTHING",
            [job_id for job_id, _ in kept],
            [envelope.model_dump(mode="json") for _, envelope in kept],
        )
    done = [
        job_id
        for job_id, request in requests.items()
        if request.stored and jobs[job_id].state.is_final
    ]
    if done:
        await conn.execute("DELETE FROM cancel_requests WHERE job_id = ANY($1::uuid[])", done)


def _unpositioned(
    job_id: UUID, base_version: int, envelopes: Sequence[Envelope], now: datetime
) -> list[RecordedEvent]:
    """``envelopes`` as they will be recorded, but for their positions (0 until the
    append, which sets the jobs row's last_position itself)."""
    return [
        RecordedEvent(
            stream_id=job_id,
            version=base_version + number,
            position=0,
            recorded_at=now,
            envelope=envelope,  # job_id set by follow()
        )
        for number, envelope in enumerate(envelopes, start=1)
    ]


def _split(batch: list[_Waiting]) -> list[list[_Waiting]]:
    """``batch`` a job at a time (in order of first message), or, for one job's, a
    message at a time."""
    by_job: dict[UUID, list[_Waiting]] = {}
    for item in batch:
        by_job.setdefault(item.job_id, []).append(item)
    if len(by_job) > 1:
        return list(by_job.values())
    return [[item] for item in batch]


def _settle_all(batch: Sequence[_Waiting], exc: BaseException) -> None:
    for item in batch:
        if not item.done.done():
            item.done.set_exception(exc)


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
