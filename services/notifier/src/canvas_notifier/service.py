"""The asyncio shell around :mod:`canvas_notifier.hub`: one websockets server for both
the WebSocket API (docs/api.md) and the plain HTTP probes (/health, /ready,
/metrics), a broker consumer that feeds the hub, and the replays from the event store.

Per connection three tasks run: a reader (client messages), a sender (drains the
connection's outbox) and a sync task while it replays; the handler waits for the first
of: the client leaving, a close the hub asked for (4008, 4009, 1013), the token's
expiry (4401). Live frames mostly skip the sender: the hub writes a frame straight to a
socket that takes it (:func:`_writer`), so fan-out costs one write per connection, no
task switch; the JSON of a frame is encoded once per event, not per connection.

The notifier's queue on the broker is exclusive to this process and goes away with its
connection: events published while it is away are never delivered to it. So whenever
the queue is new (the first message from a new consumer, or a reconnect seen by the
watcher), every connection whose last replay began before that queue was bound replays
from the event store after its last position (the others cannot have missed anything:
what commits after a replay reads reaches a queue bound before it).

Logs: a line per connect and disconnect, and one per pushed event that ends an attempt
or a job (completed, error, cancelled) at INFO; the other pushes (queued, started, each
object drawn) only at DEBUG: at a thousand events a second the lines would cost more
CPU than the fan-out.

Traces: each event handed to the hub is a ``deliver`` span, the child of its consume
span (the frame's type, the connections that took it).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import asyncpg
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as websocket_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from canvas_events import tracing
from canvas_events.auth import Principal, decode_token
from canvas_events.broker import ACK, Broker, Consumer, DeadLetter, Outcome
from canvas_events.envelope import Envelope
from canvas_events.errors import AuthError, PoisonMessage
from canvas_events.ops import Probes, Readiness
from canvas_events.postgres import Database, is_outage
from canvas_events.runtime import cancel_and_wait, instance_id
from canvas_notifier.frames import (
    MAX_SUBSCRIPTIONS,
    STATUS_TYPES,
    Invalid,
    Subscribe,
    Target,
    Unsubscribe,
    control,
    error,
    parse_client_message,
    to_frame,
)
from canvas_notifier.hub import (
    BAD_REQUEST,
    INTERNAL_ERROR,
    REPLAY_LIMIT,
    TOO_SLOW,
    TRY_AGAIN_LATER,
    UNAUTHORIZED,
    Client,
    Hub,
    Writer,
)
from canvas_notifier.metrics import Metrics
from canvas_notifier.settings import Settings
from canvas_store import events, jobs
from canvas_store.connections import init_connection

log = structlog.get_logger("canvas_notifier")

WS_PATH: Final = "/ws"
# Rows per replay query: large enough to amortise the round trip, small enough that a
# client far behind does not pull thousands of rows into memory at once.
REPLAY_PAGE: Final = 500
# Messages queued in the broker for this process at once; handing one to the hub
# takes microseconds, so this only bounds what a crash would redeliver.
PREFETCH: Final = 256
# How often the watcher looks at the broker's connect count.
WATCH_INTERVAL: Final = 0.25
# Frames whose push is logged at INFO: how each attempt or job ended.
OUTCOME_FRAMES: Final = frozenset({"ai_generation_completed", "ai_job_error", "ai_job_cancelled"})


def _database_away(exc: BaseException) -> bool:
    """The database away, or not migrated yet: retried, never the client's fault."""
    return is_outage(exc) or isinstance(exc, asyncpg.UndefinedTableError)


class Notifier:
    """Everything one notifier process runs; ``start()`` needs neither the database nor
    the broker (both connect in the background, /ready says when they are up)."""

    def __init__(
        self, settings: Settings, *, host: str = "0.0.0.0", port: int | None = None
    ) -> None:
        self.settings = settings
        self.host = host
        self._port = settings.notifier_port if port is None else port
        # Unique even with several notifiers in one process (tests): the queue is per process.
        self.instance_id = f"{instance_id('notifier')}-{uuid.uuid4().hex[:8]}"
        self.hub = Hub()
        self.database = Database(
            settings.database_url.get_secret_value(), min_size=1, init=init_connection
        )
        self.broker = Broker.of(settings, self.instance_id)
        self.broker.add_consumer(
            Consumer(
                settings.topology.notifier(self.instance_id), self._on_event, prefetch=PREFETCH
            )
        )
        self.readiness = Readiness()
        self.readiness.add_database(self.database)
        self.readiness.add_broker(self.broker)
        self.metrics = Metrics()
        self.probes = Probes(self.readiness, self.metrics.registry)
        self._secret = settings.secret
        self._server: Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._syncs: dict[Client, asyncio.Task[None]] = {}
        self._consumer_tag: str | None = None
        self._log_every_event = logging.getLogger("canvas_notifier").isEnabledFor(logging.DEBUG)

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when started with port 0)."""
        if self._server is None:
            return self._port
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def start(self) -> None:
        """Listen, and connect to the database and the broker in the background."""
        await self.database.start()
        await self.broker.start()
        self._server = await websocket_serve(
            self._handle,
            self.host,
            self._port,
            process_request=self._process_request,
            # permessage-deflate costs about 64 KiB a connection, 14 KiB without.
            compression=None,
            ping_interval=self.settings.ws_ping_interval_seconds,
            ping_timeout=self.settings.ws_ping_timeout_seconds,
            # Clients only ever send small subscribe messages.
            max_size=self.settings.max_request_bytes,
            server_header=None,
        )
        self._watcher = asyncio.create_task(self._watch_broker(), name="notifier-broker-watch")

    async def stop(self) -> None:
        """Close every connection with 1001 (going away), then the broker and database."""
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._server.wait_closed(), max(self.settings.shutdown_grace_seconds, 1.0)
                )
        tasks = [task for task in (self._watcher, *self._syncs.values()) if task is not None]
        await cancel_and_wait(*tasks)
        await self.broker.stop(drain_timeout=5.0)
        await self.database.stop()

    # -- HTTP ------------------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            return None  # the WebSocket handshake goes on; the token is checked after it
        answer = await self.probes.answer(path)
        if answer is not None:
            return _response(answer.status, answer.body, answer.content_type)
        return _json_response(http.HTTPStatus.NOT_FOUND, {"detail": "not found"})

    # -- one connection --------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None  # the handshake is done
        query = parse_qs(urlsplit(request.path).query)
        try:
            principal = decode_token(_token(query, request.headers), self._secret)
        except AuthError as exc:
            log.info("client rejected", reason=str(exc))
            # The reason says what is wrong with the token (never the token itself); a
            # close frame's reason holds at most 123 bytes.
            await ws.close(UNAUTHORIZED, str(exc).encode()[:123].decode(errors="ignore"))
            return
        try:
            after = _after(query)
        except ValueError:
            log.info("client rejected", reason="bad after", user_id=principal.user_id)
            await ws.close(BAD_REQUEST, "after must be a non-negative integer")
            return

        structlog.contextvars.bind_contextvars(user_id=principal.user_id)
        client = Client(
            principal.user_id,
            limit=self.settings.ws_send_queue_size,
            writer=_writer(ws, self.metrics.messages_sent),
        )
        if after is not None:
            client.last_position = after
        # In the hub before the replay reads the store: live events are held, not lost.
        client.hold()
        self.hub.add(client)
        self.metrics.connections.inc()
        log.info("client connected", after=after, connections=len(self.hub))
        self._start_sync(client, first=True, from_head=after is None)
        tasks = {
            _task(self._send(ws, client), "sender"),
            _task(self._read(ws, client), "reader"),
            _task(_expiry(principal), "expiry"),
            _task(client.wait_kicked(), "kick"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            await self._finish(ws, client, done)
        finally:
            self.hub.remove(client)
            self.metrics.connections.dec()
            sync = self._syncs.pop(client, None)
            ending = [*tasks, *([sync] if sync else [])]
            for task in ending:
                task.cancel()
            await asyncio.gather(*ending, return_exceptions=True)
            log.info(
                "client disconnected",
                code=ws.close_code,
                reason=ws.close_reason,
                last_sent=client.last_sent,
                connections=len(self.hub),
            )

    async def _finish(self, ws: ServerConnection, client: Client, done: set[Any]) -> None:
        for task in done:
            if task.cancelled():
                continue
            name = task.get_name()
            if name == "kick":
                kick = task.result()
                if kick.code == TOO_SLOW:
                    self.metrics.slow_client_closes.inc()
                    log.warning("slow client closed", pending=client.pending)
                await ws.close(kick.code, kick.reason)
            elif name == "expiry":
                await ws.close(UNAUTHORIZED, "token expired")
            elif task.exception() is not None and not isinstance(
                task.exception(), ConnectionClosed
            ):
                log.error("connection failed", exc_info=task.exception())
                await ws.close(INTERNAL_ERROR, "internal error")

    async def _send(self, ws: ServerConnection, client: Client) -> None:
        # Only what the writer could not put on the socket at once comes this way.
        while True:
            data = await client.next_data()
            await ws.send(data, text=True)
            self.metrics.messages_sent.inc()

    async def _read(self, ws: ServerConnection, client: Client) -> None:
        async for raw in ws:
            message = parse_client_message(raw)
            if isinstance(message, Invalid):
                client.say(error(message.detail))
            elif isinstance(message, Subscribe):
                await self._subscribe(client, message.target)
            elif isinstance(message, Unsubscribe):
                client.subscription = client.subscription.remove(message.target)
                fields = message.target.as_fields() if message.target else {}
                client.say(control("unsubscribed", **fields))

    async def _subscribe(self, client: Client, target: Target) -> None:
        if client.subscription.size >= MAX_SUBSCRIPTIONS:
            client.say(error(f"at most {MAX_SUBSCRIPTIONS} subscriptions", **target.as_fields()))
            return
        try:
            owned = await self._owns(client.user_id, target)
        except Exception as exc:
            if not _database_away(exc):
                raise
            client.say(error("cannot check the subscription now; try again", **target.as_fields()))
            return
        if not owned:
            # Someone else's job reads exactly like one that does not exist.
            thing = "job" if target.kind == "job_id" else "canvas"
            client.say(error(f"{thing} not found", **target.as_fields()))
            return
        client.subscription = client.subscription.add(target)
        client.say(control("subscribed", **target.as_fields()))

    async def _owns(self, user_id: str, target: Target) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.ws_subscribe_wait_seconds
        while True:
            pool = self.database.pool
            if target.kind == "job_id":
                owner = await jobs.job_owner(pool, uuid.UUID(target.id))
            else:
                owner = await jobs.canvas_owner(pool, target.id)
            if owner == user_id:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)

    # -- replay ----------------------------------------------------------------------

    def _start_sync(self, client: Client, *, first: bool, from_head: bool = False) -> None:
        if client in self._syncs:
            return  # the running sync sees resync_needed before it releases
        task = asyncio.create_task(self._sync(client, first=first, from_head=from_head))
        self._syncs[client] = task
        task.add_done_callback(
            lambda done: self._syncs.pop(client) if self._syncs.get(client) is done else None
        )

    async def _sync(self, client: Client, *, first: bool, from_head: bool) -> None:
        # A resync starts from the broker handler: keep that message's ids out of these logs.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(user_id=client.user_id)
        delay = 0.2
        while client.kick is None:
            try:
                if from_head:
                    # Without `after` a connection starts live: nothing from before it.
                    client.last_position = await events.user_head(
                        self.database.pool, client.user_id
                    )
                    from_head = False
                await self._catch_up(client)
                return
            except Exception as exc:
                if not _database_away(exc):
                    log.exception("replay failed")
                    client.close(INTERNAL_ERROR, "internal error")
                    return
                if first:
                    log.warning("database unavailable for a new connection", error=str(exc))
                    client.close(TRY_AGAIN_LATER, "database unavailable; try again later")
                    return
                log.warning("replay failed; retrying", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _catch_up(self, client: Client) -> None:
        """Replay the store after ``client.last_position`` while holding live frames,
        until no resync was asked for meanwhile; then release them."""
        limit = self.settings.replay_limit
        replayed = 0
        while client.kick is None:
            client.hold()
            client.resync_needed = False
            # Bound before this replay reads: whatever commits after the read reaches
            # this queue, so a later trigger for this same queue can spare the client.
            client.synced_with = self._queue_generation()
            client.replayed = True
            cursor = client.last_position
            while True:
                size = min(REPLAY_PAGE, limit - replayed)
                if size == 0:
                    if await self._replay_page(client, cursor, 1):
                        await self._replay_limit_reached(client)
                        return
                    break
                page = await self._replay_page(client, cursor, size)
                for envelope in page:
                    assert envelope.position is not None
                    cursor = envelope.position
                    replayed += 1
                    try:
                        frame = to_frame(envelope)
                    except PoisonMessage as exc:
                        log.error("stored event skipped", position=cursor, error=str(exc))
                        continue
                    if frame is None:
                        continue
                    if not await client.replay(frame):
                        return
                    self.metrics.replayed_events.inc()
                if len(page) < size:
                    break
            await client.wait_drained()
            if client.kick is None and not client.resync_needed:
                client.release()
                return

    async def _replay_page(self, client: Client, after: int, limit: int) -> list[Envelope]:
        """The client's status events after position ``after``, ``limit`` at most."""
        return await events.user_events_after(
            self.database.pool, client.user_id, after, STATUS_TYPES, limit
        )

    async def _replay_limit_reached(self, client: Client) -> None:
        # Let what was replayed reach the client first, so that its reconnect moves on.
        await client.wait_drained()
        log.info("replay limit reached", limit=self.settings.replay_limit)
        client.close(REPLAY_LIMIT, f"replay limit reached; reconnect with after={client.last_sent}")

    def _queue_generation(self) -> int | None:
        """Which broker connection's queue is bound and consuming now; None when it is
        unknown (not connected, or connecting: a new queue may be taking over)."""
        return self.broker.connect_count if self.broker.connected else None

    def _resync_all(self, reason: str) -> None:
        """The broker queue is new: every connection whose last replay began before it
        was bound replays again after its last position (the others miss nothing)."""
        current = self._queue_generation()
        clients = [
            client
            for client in self.hub.clients()
            if client.kick is None
            and not self._first_replay_pending(client)
            and (current is None or client.synced_with != current)
        ]
        if not clients:
            return
        self.metrics.resyncs.inc()
        log.info("replaying for connections", reason=reason, connections=len(clients))
        for client in clients:
            client.hold()
            client.resync_needed = True
            self._start_sync(client, first=False)

    def _first_replay_pending(self, client: Client) -> bool:
        """Whether ``client``'s first replay is running and has not begun to read: it binds
        to the queue current when it does (``synced_with``), so it misses nothing, and a
        resync would only replay it twice (seen under load, as a flaky resync count)."""
        return client in self._syncs and not client.replayed

    async def _watch_broker(self) -> None:
        # The consumer-tag check in _on_event catches a new queue before its first
        # message is delivered; this catches it when no message comes at all.
        seen = self.broker.connect_count
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if self.broker.connect_count != seen:
                seen = self.broker.connect_count
                self._resync_all("broker connected")

    # -- the broker ------------------------------------------------------------------

    async def _on_event(self, envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        # No await before the hub has the frame: the broker runs handlers in delivery
        # order, and the hub relies on that order. A new consumer tag is a new queue:
        # the connections that may have missed events hold before its first frame.
        if message.consumer_tag != self._consumer_tag:
            self._consumer_tag = message.consumer_tag
            self._resync_all("new broker queue")
        if envelope.user_id is None:
            return ACK
        try:
            frame = to_frame(envelope)
        except PoisonMessage as exc:
            return DeadLetter(str(exc))
        if frame is None:
            return ACK
        self.metrics.events_received.labels(type=envelope.type).inc()
        with tracing.span("deliver", attributes={"canvas.frame_type": frame.type}) as span:
            taken, _ = self.hub.deliver(envelope.user_id, frame)
            span.set_attribute("canvas.connections", taken)
        # A log line costs more CPU than the fan-out of its event (about 150 us; and
        # structlog runs its processors even for a line the level then drops): INFO
        # for a job's outcomes, the rest only when DEBUG is on.
        outcome = frame.type in OUTCOME_FRAMES
        if outcome or self._log_every_event:
            (log.info if outcome else log.debug)(
                "event pushed",
                type=envelope.type,
                position=envelope.position,
                user_id=envelope.user_id,
                connections=taken,
            )
        return ACK


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run a notifier until ``stop`` is set, then close every connection with 1001."""
    notifier = Notifier(settings)
    await notifier.start()
    log.info("notifier listening", port=notifier.port, path=WS_PATH)
    try:
        await stop.wait()
        log.info("notifier stopping; closing connections", connections=len(notifier.hub))
    finally:
        await notifier.stop()
    log.info("notifier stopped")


def _task(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    return asyncio.create_task(coro, name=name)


def _writer(ws: ServerConnection, sent: Counter) -> Writer:
    """Write a text frame to ``ws`` now when nothing makes it wait: the connection is
    open, its socket below the write buffer's high-water mark, no fragmented message
    half sent. What ``websockets.broadcast()`` does, with backpressure: a frame the
    socket cannot take now stays in the connection's bounded outbox instead."""

    def write(data: bytes) -> bool:
        if ws.protocol.state is not State.OPEN or ws.paused or ws.send_in_progress is not None:
            return False
        try:
            ws.protocol.send_text(data)
        except Exception:
            return False  # nothing written; the sender meets the error and ends the connection
        # A socket that fails here is broken: the connection ends, the client resumes.
        with contextlib.suppress(Exception):
            ws.send_data()
        sent.inc()
        return True

    return write


MISSING_TOKEN: Final = "missing token: send ?token=JWT or Authorization: Bearer JWT"  # noqa: S105


def _token(query: dict[str, list[str]], headers: Headers) -> str:
    # Browsers cannot set headers on a WebSocket: ?token= first, the header for the rest.
    if query.get("token"):
        return query["token"][0]
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError(MISSING_TOKEN)
    return value.strip()


def _after(query: dict[str, list[str]]) -> int | None:
    values = query.get("after")
    if not values:
        return None
    raw = values[0]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ValueError("after must be a non-negative integer")
    return int(raw)


async def _expiry(principal: Principal) -> None:
    await asyncio.sleep(max(0.0, (principal.expires_at - datetime.now(UTC)).total_seconds()))


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _json_response(status: http.HTTPStatus, body: dict[str, Any]) -> Response:
    return _response(status, orjson.dumps(body), "application/json")
