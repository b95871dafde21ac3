"""``canvas-orchestrator dlq``: see the dead-lettered messages, send chosen ones back, or
drop those that should never run.

A message lands in a ``.dlq`` queue in two ways (canvas_events.broker):

- a consumer gave up on it (not an envelope, unknown type, newer schema, or its handler
  failed ``max_attempts`` times): the copy carries the reason in ``x-canvas-error`` and
  its origin in ``x-canvas-queue`` / ``x-canvas-routing-key`` / ``x-canvas-dead-lettered-at``;
- the broker moved it through the queue's own ``x-dead-letter-exchange`` (a reject
  without requeue when the consumer could not reach the DLX): the origin and reason are
  then only in RabbitMQ's ``x-death`` header.

How the messages are read without losing them or their order: ``basic.get`` without
ack on a channel of our own, then closing that channel, which puts back every message
not acked, in its original place (RabbitMQ keeps a classic queue in publication order
across requeues; tests/orchestrator/test_dlq.py checks it on quorum queues too). A
replayed message is acked only after the broker confirmed its copy, so a crash in
between leaves it in both places at worst: consumers dedupe on the message id
(``processed_messages``), so the duplicate changes nothing. A dropped message is acked
on that channel: gone for good, so ``drop`` only shows what it would drop unless it is
given ``--yes``.

While one ``dlq`` command holds a queue's messages, another sees fewer: run one at a time.
Each message read is one round trip, so a queue of thousands takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aio_pika.exceptions import AMQPConnectionError, ChannelClosed, DeliveryError

from canvas_events.broker import (
    ATTEMPTS_HEADER,
    DEAD_LETTERED_AT_HEADER,
    DELIVERY_COUNT_HEADER,
    ERROR_HEADER,
    QUEUE_HEADER,
    ROUTING_KEY_HEADER,
)
from canvas_events.logging import configure_logging, redact
from canvas_events.runtime import instance_id
from canvas_events.topology import Topology
from canvas_orchestrator.settings import Settings

PROGRAM: Final = "canvas-orchestrator dlq"
log = structlog.get_logger("canvas_orchestrator.dlq")

# What a replayed copy leaves behind: the record of this dead-lettering, the attempt
# count (so the consumer gets its full max_attempts again), and the broker's own
# history of it. Any other header travels on unchanged.
DROPPED_HEADERS: Final = frozenset(
    {
        ERROR_HEADER,
        QUEUE_HEADER,
        ROUTING_KEY_HEADER,
        DEAD_LETTERED_AT_HEADER,
        ATTEMPTS_HEADER,
        # A quorum .dlq's count of its own deliveries: the copy is a new message.
        DELIVERY_COUNT_HEADER,
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-last-death-exchange",
    }
)
DEFAULT_LIST_LIMIT: Final = 100
# basic.get and confirms are answered in milliseconds; these bound a broker that hangs.
RPC_TIMEOUT: Final = 10.0


class QueueMissing(LookupError):
    """A dead-letter queue of the topology does not exist on the broker."""


class ReplayFailed(RuntimeError):
    """A dead-lettered message could not be routed anywhere; it stays where it is."""


@dataclass(frozen=True)
class DeadLetteredMessage:
    """What an operator needs to know about one dead-lettered message (no body: it holds
    the user's prompt, and its size is enough to spot a giant)."""

    queue: str  # the .dlq it sits in
    message_id: str  # the AMQP message id (the envelope's event_id), or a body hash
    type: str | None
    job_id: str | None
    correlation_id: str | None
    original_queue: str | None
    routing_key: str | None
    reason: str
    dead_lettered_at: str | None
    dead_lettered_by: Literal["consumer", "broker", "unknown"]
    body_bytes: int


@dataclass(frozen=True)
class QueueCount:
    """A dead-letter queue and how many messages it holds (ready, not only those listed)."""

    queue: str
    messages: int | None  # None: the queue does not exist


@dataclass
class Listing:
    """The answer of ``dlq list``."""

    queues: list[QueueCount] = field(default_factory=list)
    messages: list[DeadLetteredMessage] = field(default_factory=list)


@dataclass
class ReplayReport:
    """The answer of ``dlq replay``: where each chosen message went, or why it stayed."""

    replayed: list[tuple[DeadLetteredMessage, str]] = field(default_factory=list)
    failed: list[tuple[DeadLetteredMessage, str]] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    missing_queues: list[str] = field(default_factory=list)


@dataclass
class DropReport:
    """The answer of ``dlq drop``: the chosen messages, dropped or (without ``--yes``)
    only counted."""

    confirmed: bool
    chosen: list[DeadLetteredMessage] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    missing_queues: list[str] = field(default_factory=list)


# -- reading one message --------------------------------------------------------------


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _body(message: AbstractIncomingMessage) -> dict[str, Any]:
    try:
        body = json.loads(message.body)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def message_key(message: AbstractIncomingMessage) -> str:
    """The id an operator passes to ``replay``: the AMQP message id, else the envelope's
    event_id, else a hash of the body (a message that is not even JSON has no other)."""
    if message.message_id:
        return message.message_id
    event_id = _body(message).get("event_id")
    if isinstance(event_id, str) and event_id:
        return event_id
    return "sha256:" + hashlib.sha256(message.body).hexdigest()[:16]


def _last_death(headers: dict[str, Any]) -> dict[str, Any] | None:
    deaths = headers.get("x-death")
    # RabbitMQ puts the most recent dead-lettering first.
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return None


def origin(message: AbstractIncomingMessage) -> tuple[str | None, str | None]:
    """(the queue the message was dead-lettered from, the routing key it had there)."""
    headers = dict(message.headers or {})
    queue = _text(headers.get(QUEUE_HEADER))
    routing_key = _text(headers.get(ROUTING_KEY_HEADER))
    death = _last_death(headers)
    if queue is None and death is not None:
        queue = _text(death.get("queue"))
        keys = death.get("routing-keys")
        if isinstance(keys, list) and keys:
            routing_key = _text(keys[0])
    # A message the consumer retried came back through the default exchange, so the key
    # it had when it was dead-lettered is the queue's name: it says nothing more.
    if routing_key is not None and routing_key == queue:
        routing_key = None
    return queue, routing_key or None


def describe(queue: str, message: AbstractIncomingMessage) -> DeadLetteredMessage:
    """What :class:`DeadLetteredMessage` says about ``message``, read in ``queue``."""
    headers = dict(message.headers or {})
    body = _body(message)
    original_queue, routing_key = origin(message)
    death = _last_death(headers)
    by: Literal["consumer", "broker", "unknown"]
    if ERROR_HEADER in headers:
        by = "consumer"
        reason = _text(headers[ERROR_HEADER]) or ""
        when = _text(headers.get(DEAD_LETTERED_AT_HEADER))
    elif death is not None:
        by = "broker"
        reason = f"{_text(death.get('reason'))} by the broker (x-death)"
        when = _text(death.get("time"))
    else:
        by, reason, when = "unknown", "no reason recorded", None
    job_id = body.get("job_id")
    return DeadLetteredMessage(
        queue=queue,
        message_id=message_key(message),
        type=message.type or _text(body.get("type")),
        job_id=str(job_id) if job_id else None,
        correlation_id=message.correlation_id or _text(body.get("correlation_id")),
        original_queue=original_queue,
        routing_key=routing_key,
        # Consumers redact what they write; this is the last line of defence.
        reason=redact(reason),
        dead_lettered_at=when,
        dead_lettered_by=by,
        body_bytes=len(message.body),
    )


def replay_copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The message as its first publisher sent it: same body and properties, without the
    headers of its dead-lettering and with its attempts reset."""
    headers = {
        key: value for key, value in (message.headers or {}).items() if key not in DROPPED_HEADERS
    }
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        # The id the operator chose it by, also for a message that had none: aiormq would
        # make up a random one, and the next listing would show a different id.
        message_id=message_key(message),
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


# -- the broker side ------------------------------------------------------------------


def resolve_queues(topology: Topology, queue: str | None) -> list[str]:
    """The dead-letter queues to look at: all of them, or the one ``queue`` names (its
    .dlq name or the name of the queue it serves). Raises ValueError for another name."""
    names = list(topology.dead_letter_queues)
    if queue is None:
        return names
    for candidate in (queue, f"{queue}.dlq"):
        if candidate in names:
            return [candidate]
    raise ValueError(f"no dead-letter queue {queue!r}; this topology has: {', '.join(names)}")


async def connect(url: str) -> AbstractConnection:
    """A plain connection (not robust: a command should fail, not wait forever)."""
    return await aio_pika.connect(
        url,
        timeout=RPC_TIMEOUT,
        client_properties={"connection_name": instance_id("job-orchestrator-dlq")},
    )


@dataclass
class _Held:
    count: int
    messages: list[AbstractIncomingMessage]


@contextlib.asynccontextmanager
async def _hold(
    connection: AbstractConnection, queue_name: str, limit: int | None
) -> AsyncIterator[_Held]:
    """Take up to ``limit`` messages from the head of ``queue_name`` without acking them;
    whatever is not acked inside the block goes back, in order, when it ends."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
        except ChannelClosed as exc:  # 404: the broker closed the channel
            raise QueueMissing(queue_name) from exc
        count = queue.declaration_result.message_count or 0
        # Only what was there at the start: a replayed message that a consumer
        # dead-letters again at once lands behind these and is not read twice.
        wanted = count if limit is None else min(count, limit)
        messages: list[AbstractIncomingMessage] = []
        while len(messages) < wanted:
            message = await queue.get(no_ack=False, fail=False, timeout=RPC_TIMEOUT)
            if message is None:
                break
            messages.append(message)
        yield _Held(count, messages)
    finally:
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()


async def list_dead_letters(
    url: str, topology: Topology, *, queues: Sequence[str], limit: int = DEFAULT_LIST_LIMIT
) -> Listing:
    """Up to ``limit`` messages from the head of each of ``queues``; all of them stay."""
    listing = Listing()
    connection = await connect(url)
    async with connection:
        for name in queues:
            try:
                async with _hold(connection, name, limit) as held:
                    listing.queues.append(QueueCount(name, held.count))
                    listing.messages.extend(describe(name, m) for m in held.messages)
            except QueueMissing:
                listing.queues.append(QueueCount(name, None))
    return listing


class _Publisher:
    """A confirming channel whose unroutable publishes raise (mandatory + returns)."""

    def __init__(self, connection: AbstractConnection, topology: Topology) -> None:
        self._connection = connection
        self._topology = topology
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def _open(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._exchange = None
        return self._channel

    async def _events_exchange(self) -> AbstractExchange | None:
        if self._exchange is None:
            try:
                self._exchange = await (await self._open()).get_exchange(self._topology.exchange)
            except ChannelClosed:
                return None  # the 404 closed the channel; _open makes another next time
        return self._exchange

    async def publish(self, message: AbstractIncomingMessage) -> str:
        """Publish the replay copy of ``message``; where it went, or ReplayFailed."""
        queue, routing_key = origin(message)
        copy = replay_copy(message)
        if queue is not None:
            channel = await self._open()
            with contextlib.suppress(DeliveryError):  # returned: the queue is gone
                await channel.default_exchange.publish(
                    copy, queue, mandatory=True, timeout=RPC_TIMEOUT
                )
                return f"queue {queue}"
        if routing_key is None:
            raise ReplayFailed(
                f"queue {queue} is gone and the original routing key is unknown"
                if queue
                else "the message says neither its queue nor its routing key"
            )
        exchange = await self._events_exchange()
        if exchange is None:
            raise ReplayFailed(f"exchange {self._topology.exchange} does not exist")
        try:
            await exchange.publish(copy, routing_key, mandatory=True, timeout=RPC_TIMEOUT)
        except DeliveryError as exc:
            raise ReplayFailed(f"no queue is bound to routing key {routing_key}") from exc
        return f"exchange {self._topology.exchange} ({routing_key})"


@dataclass
class _Choice:
    """Which dead letters an action wants (every one when ``wanted`` is None), and what
    walking the queues for them found."""

    wanted: set[str] | None
    found: set[str] = field(default_factory=set)
    missing_queues: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, message_ids: Iterable[str] | None) -> _Choice:
        return cls(None if message_ids is None else set(message_ids))

    def not_found(self) -> list[str]:
        return [] if self.wanted is None else sorted(self.wanted - self.found)


async def _chosen(
    connection: AbstractConnection, queues: Sequence[str], choice: _Choice
) -> AsyncGenerator[tuple[AbstractIncomingMessage, DeadLetteredMessage]]:
    """Each message of ``queues`` that ``choice`` wants, held (unacked), with what it is,
    in queue order; a queue that does not exist is noted in ``choice``. What the caller
    does not ack goes back, in order, when it moves to the next queue."""
    for name in queues:
        try:
            async with _hold(connection, name, None) as held:
                for message in held.messages:
                    key = message_key(message)
                    if choice.wanted is None or key in choice.wanted:
                        choice.found.add(key)
                        yield message, describe(name, message)
        except QueueMissing:
            choice.missing_queues.append(name)


async def replay(
    url: str, topology: Topology, *, queues: Sequence[str], message_ids: Iterable[str] | None
) -> ReplayReport:
    """Send the chosen dead-lettered messages (every one when ``message_ids`` is None)
    back where they came from, in queue order; ack each after the broker confirmed it."""
    choice = _Choice.of(message_ids)
    report = ReplayReport()
    connection = await connect(url)
    async with connection:
        publisher = _Publisher(connection, topology)
        async with contextlib.aclosing(_chosen(connection, queues, choice)) as chosen:
            async for message, about in chosen:
                try:
                    destination = await publisher.publish(message)
                except ReplayFailed as exc:
                    report.failed.append((about, str(exc)))
                    continue
                await message.ack()
                report.replayed.append((about, destination))
                _log_replayed(about, destination)
    report.missing_queues, report.not_found = choice.missing_queues, choice.not_found()
    return report


def _log_replayed(about: DeadLetteredMessage, destination: str) -> None:
    # The audit trail of an operator's action, findable by the job like every other step.
    log.info(
        "dead letter replayed",
        job_id=about.job_id,
        correlation_id=about.correlation_id,
        message_id=about.message_id,
        message_type=about.type,
        dead_letter_queue=about.queue,
        destination=destination,
    )


async def drop(
    url: str,
    topology: Topology,
    *,
    queues: Sequence[str],
    message_ids: Iterable[str] | None,
    confirmed: bool,
) -> DropReport:
    """Remove the chosen dead-lettered messages (every one when ``message_ids`` is None)
    for good, when ``confirmed``; else only say which they are: all of them stay."""
    choice = _Choice.of(message_ids)
    report = DropReport(confirmed=confirmed)
    connection = await connect(url)
    async with connection, contextlib.aclosing(_chosen(connection, queues, choice)) as chosen:
        async for message, about in chosen:
            if confirmed:
                await message.ack()
                _log_dropped(about)
            report.chosen.append(about)
    report.missing_queues, report.not_found = choice.missing_queues, choice.not_found()
    return report


def _log_dropped(about: DeadLetteredMessage) -> None:
    log.warning(
        "dead letter dropped",
        job_id=about.job_id,
        correlation_id=about.correlation_id,
        message_id=about.message_id,
        message_type=about.type,
        dead_letter_queue=about.queue,
        reason=about.reason,
    )


# -- the command ----------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    """Add ``dlq list``, ``dlq replay`` and ``dlq drop`` to the console script's
    subcommands."""
    dlq = commands.add_parser(
        "dlq",
        help="list dead-lettered messages with their reason, or replay chosen ones",
        description="Dead-letter queues of AMQP_TOPOLOGY_PREFIX on AMQP_URL. Output on "
        "stdout, log lines on stderr.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="show the dead-lettered messages (none leave)")
    listing.add_argument("--queue", help="one dead-letter queue (NAME.dlq or NAME)")
    listing.add_argument(
        "--limit",
        type=_positive,
        default=DEFAULT_LIST_LIMIT,
        help=f"messages shown per queue, oldest first (default {DEFAULT_LIST_LIMIT})",
    )
    listing.add_argument("--json", action="store_true", help="one JSON document")
    replaying = actions.add_parser(
        "replay", help="send chosen messages back to their queue and remove them from the .dlq"
    )
    replaying.add_argument("message_ids", nargs="*", metavar="MESSAGE_ID")
    replaying.add_argument("--queue", help="only this dead-letter queue (NAME.dlq or NAME)")
    replaying.add_argument("--all", action="store_true", help="every message of the queue(s)")
    replaying.add_argument("--json", action="store_true", help="one JSON document")
    dropping = actions.add_parser(
        "drop",
        help="remove chosen messages from the .dlq for good (shows them only, without --yes)",
        description="Without --yes, nothing is removed: the messages that would be dropped "
        "and their count are shown, and the exit code is 2.",
    )
    dropping.add_argument("message_ids", nargs="*", metavar="MESSAGE_ID")
    dropping.add_argument("--queue", help="only this dead-letter queue (NAME.dlq or NAME)")
    dropping.add_argument("--all", action="store_true", help="every message of the queue(s)")
    dropping.add_argument("--yes", action="store_true", help="drop them (there is no undo)")
    dropping.add_argument("--json", action="store_true", help="one JSON document")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``dlq list`` / ``replay`` / ``drop``: 0 when done, 1 when something was not, 2
    for bad arguments (and for a ``drop`` without ``--yes``, which drops nothing)."""
    # stdout carries the answer (a table or JSON to pipe into jq); log lines go aside.
    configure_logging(
        "job-orchestrator", settings.log_level, settings.log_format, stream=sys.stderr
    )
    try:
        queues = resolve_queues(settings.topology, args.queue)
    except ValueError as exc:
        print(f"{PROGRAM}: {exc}", file=sys.stderr)
        return 2
    if args.dlq_command != "list" and bool(args.message_ids) == bool(args.all):
        print(f"{PROGRAM} {args.dlq_command}: give MESSAGE_ID... or --all", file=sys.stderr)
        return 2
    try:
        return await _act(args, settings, queues)
    except Exception as exc:
        unreachable = isinstance(exc, OSError | TimeoutError | AMQPConnectionError)
        what = "cannot reach the broker" if unreachable else "failed"
        message = redact(f"{type(exc).__name__}: {exc}")
        log.error(f"dlq {args.dlq_command} {what}", error=message)
        print(f"{PROGRAM}: {what}: {message}", file=sys.stderr)
        return 1


async def _act(args: argparse.Namespace, settings: Settings, queues: list[str]) -> int:
    """The chosen action, its answer printed; its exit code."""
    url, topology = settings.amqp_url.get_secret_value(), settings.topology
    if args.dlq_command == "list":
        listing = await list_dead_letters(url, topology, queues=queues, limit=args.limit)
        print(_listing_json(listing) if args.json else _listing_text(listing))
        return 0
    ids = None if args.all else args.message_ids
    if args.dlq_command == "drop":
        dropped = await drop(url, topology, queues=queues, message_ids=ids, confirmed=args.yes)
        print(_drop_json(dropped) if args.json else _drop_text(dropped))
        if not dropped.confirmed and dropped.chosen:
            return 2
        return 1 if dropped.not_found else 0
    report = await replay(url, topology, queues=queues, message_ids=ids)
    print(_report_json(report) if args.json else _report_text(report))
    return 1 if report.failed or report.not_found else 0


def _listing_json(listing: Listing) -> str:
    return json.dumps(
        {
            "queues": [asdict(count) for count in listing.queues],
            "messages": [asdict(message) for message in listing.messages],
        },
        indent=2,
    )


def _listing_text(listing: Listing) -> str:
    lines: list[str] = []
    by_queue: dict[str, list[DeadLetteredMessage]] = {}
    for message in listing.messages:
        by_queue.setdefault(message.queue, []).append(message)
    for count in listing.queues:
        if count.messages is None:
            lines.append(f"{count.queue}: does not exist (is AMQP_TOPOLOGY_PREFIX right?)")
            continue
        shown = by_queue.get(count.queue, [])
        more = f", showing the oldest {len(shown)}" if len(shown) < count.messages else ""
        lines.append(f"{count.queue}: {count.messages} message(s){more}")
        for message in shown:
            lines.extend(_message_lines(message))
    return "\n".join(lines)


def _message_lines(message: DeadLetteredMessage) -> list[str]:
    where = message.original_queue or "?"
    if message.routing_key:
        where += f" (routing key {message.routing_key})"
    return [
        f"  {message.message_id}  {message.type or '?'}  job {message.job_id or '-'}",
        f"    dead-lettered {message.dead_lettered_at or '?'} by the "
        f"{message.dead_lettered_by} from {where}",
        f"    reason: {message.reason}",
    ]


def _report_json(report: ReplayReport) -> str:
    return json.dumps(
        {
            "replayed": [
                {**asdict(message), "destination": destination}
                for message, destination in report.replayed
            ],
            "failed": [{**asdict(message), "error": error} for message, error in report.failed],
            "not_found": report.not_found,
            "missing_queues": report.missing_queues,
        },
        indent=2,
    )


def _report_text(report: ReplayReport) -> str:
    lines = [
        f"replayed {m.message_id} ({m.type or '?'}, job {m.job_id or '-'}) to {destination}"
        for m, destination in report.replayed
    ]
    lines += [f"kept {m.message_id} in {m.queue}: {error}" for m, error in report.failed]
    lines += [f"not found: {message_id}" for message_id in report.not_found]
    lines += [f"{name}: does not exist" for name in report.missing_queues]
    return "\n".join(lines) or "nothing to replay"


def _drop_json(report: DropReport) -> str:
    return json.dumps(
        {
            "dropped" if report.confirmed else "would_drop": [asdict(m) for m in report.chosen],
            "count": len(report.chosen),
            "not_found": report.not_found,
            "missing_queues": report.missing_queues,
        },
        indent=2,
    )


def _drop_text(report: DropReport) -> str:
    verb = "dropped" if report.confirmed else "would drop"
    lines = [
        f"{verb} {m.message_id} ({m.type or '?'}, job {m.job_id or '-'}) from {m.queue}: {m.reason}"
        for m in report.chosen
    ]
    lines += [f"not found: {message_id}" for message_id in report.not_found]
    lines += [f"{name}: does not exist" for name in report.missing_queues]
    count = len(report.chosen)
    if report.confirmed:
        lines.append(f"dropped {count} message(s)")
    elif count:
        lines.append(f"would drop {count} message(s); nothing dropped: run again with --yes")
    else:
        lines.append("nothing to drop")
    return "\n".join(lines)
