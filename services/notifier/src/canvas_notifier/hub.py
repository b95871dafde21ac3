"""Who is connected, and what each connection still has to send; no network I/O here.

Fan-out never waits for a client: :meth:`Hub.deliver` offers the frame to each of the
user's connections and returns. A connection with nothing waiting whose socket takes
data without waiting gets the frame written at once (its *writer*, given by
:mod:`canvas_notifier.service`); otherwise the frame goes to the connection's bounded
outbox, which one sender task per connection drains onto the socket as it drains. A
connection whose outbox is full is told to close (4008) rather than slow anyone down or
hold memory: unlike ``websockets.broadcast()``, which writes whatever the socket's state
(no backpressure, by design), every connection here is bounded.

Resume without gap or duplicate: a connection is *held* while it replays from the
event store (live frames are kept aside), then *released*: the held frames at or below
the last replayed position are dropped, the rest follow. Afterwards a live frame at or
below the last position already queued is a duplicate (at-least-once delivery) and is
dropped. Positions are taken commit-ordered by the orchestrator, so everything at or
below a replayed position was in the replay.

Close codes a client may see:

    1001  server going away (shutdown): reconnect, with after=<last position>
    1011  server error, or no pong within the ping timeout
    1013  the database is unavailable: try again later, with after=<last position>
    4008  client too slow: its outbox filled up; reconnect with after=<last position>
    4009  replay limit reached: reconnect with after=<last position> to get the rest
    4400  bad request: ``after`` is not a non-negative integer
    4401  token missing, invalid or expired (the reason says which): get a new one, then reconnect
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from canvas_notifier.frames import Frame, Subscription

GOING_AWAY: Final = 1001
INTERNAL_ERROR: Final = 1011
TRY_AGAIN_LATER: Final = 1013
TOO_SLOW: Final = 4008
REPLAY_LIMIT: Final = 4009
BAD_REQUEST: Final = 4400
UNAUTHORIZED: Final = 4401

# Control frames (answers to the client's own messages) waiting at once; only a client
# that sends without ever reading gets near it.
CONTROL_LIMIT: Final = 64


@dataclass(frozen=True)
class Kick:
    """Why a connection must be closed: a WebSocket close code and reason."""

    code: int
    reason: str


Writer = Callable[[bytes], bool]
"""Writes one text frame to a connection's socket now, if it takes it without waiting
(False: not written, the frame must wait in the outbox)."""


class Offer(enum.Enum):
    """What became of a live frame offered to a connection."""

    SENT = "sent"  # written to the socket at once (or filtered out by the subscription)
    QUEUED = "queued"  # in the outbox, or held until the replay ends
    DUPLICATE = "duplicate"  # at or below the last position: already queued once
    OVERFLOW = "overflow"  # the outbox was full: the connection is told to close
    CLOSING = "closing"  # the connection is already on its way out


class Client:
    """One WebSocket connection's state: outbox, position, subscription."""

    def __init__(self, user_id: str, *, limit: int, writer: Writer | None = None) -> None:
        self.user_id = user_id
        # None: every frame goes through the outbox (and the sender task).
        self.writer = writer
        self.subscription = Subscription()
        # The highest position queued for (or replayed to) this connection.
        self.last_position = 0
        # The highest position handed to the socket: what a 4008 tells the client.
        self.last_sent = 0
        self.kick: Kick | None = None
        # Set when this connection must replay again (a new broker queue may have
        # missed events); the sync loop checks it before releasing.
        self.resync_needed = False
        # The broker connection (its count) whose queue was already bound when this
        # connection's last replay began; None when there was none. A new queue makes
        # every connection that did not replay under it replay again.
        self.synced_with: int | None = None
        # Whether a replay has read for this connection yet (its first may still be
        # waiting to begin: it then binds to whatever queue is current when it reads).
        self.replayed = False
        self._limit = limit
        self._frames: deque[Frame] = deque()
        self._control: deque[bytes] = deque()
        self._held: deque[Frame] | None = None
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._kicked = asyncio.Event()

    @property
    def holding(self) -> bool:
        """Whether live frames are kept aside while a replay runs."""
        return self._held is not None

    @property
    def pending(self) -> int:
        """Frames waiting to be sent (held ones included)."""
        return len(self._frames) + len(self._held or ())

    # -- live frames -------------------------------------------------------------------

    def offer(self, frame: Frame) -> Offer:
        """Queue a live frame without waiting; never blocks, whatever the client does."""
        if self.kick is not None:
            return Offer.CLOSING
        if self._held is not None:
            if len(self._held) >= self._limit:
                self._overflow()
                return Offer.OVERFLOW
            self._held.append(frame)
            return Offer.QUEUED
        if frame.position <= self.last_position:
            return Offer.DUPLICATE
        if self.writer is not None and not self._frames and not self._control:
            # Nothing waits before this frame: straight to the socket, without a task
            # switch, when the socket takes it now (the common case at any scale).
            if not self.subscription.matches(frame):
                self.last_position = frame.position
                return Offer.SENT
            if self.writer(frame.data):
                self.last_position = self.last_sent = frame.position
                return Offer.SENT
        if len(self._frames) >= self._limit:
            self._overflow()
            return Offer.OVERFLOW
        self._push(frame)
        return Offer.QUEUED

    def say(self, data: bytes) -> None:
        """Queue a control frame; it goes out before any waiting event frame."""
        if self.kick is not None:
            return
        if len(self._control) >= CONTROL_LIMIT:
            self._overflow()
            return
        self._control.append(data)
        self._wakeup.set()

    # -- replay --------------------------------------------------------------------------

    def hold(self) -> None:
        """Keep live frames aside from now on, until :meth:`release` (idempotent)."""
        if self._held is None:
            self._held = deque()

    async def replay(self, frame: Frame) -> bool:
        """Queue a frame read from the event store, waiting for room (the replay, not
        the fan-out, is paced by the client). False when the connection is closing."""
        while len(self._frames) >= self._limit and self.kick is None:
            self._room.clear()
            await self._room.wait()
        if self.kick is not None:
            return False
        if frame.position > self.last_position:
            self._push(frame)
        return True

    async def wait_drained(self) -> None:
        """Wait until every queued frame is on the socket (or the connection closes)."""
        while self._frames and self.kick is None:
            self._drained.clear()
            await self._drained.wait()

    def release(self) -> None:
        """End the replay: queue the held live frames that come after it, in order."""
        held, self._held = self._held, None
        for frame in held or ():
            if frame.position > self.last_position:
                self._push(frame)

    # -- the sender's side ---------------------------------------------------------------

    async def next_data(self) -> bytes:
        """The next frame to send: control frames first, then event frames that match
        the subscription as it is now (a subscribe takes effect at once)."""
        while True:
            if self._control:
                return self._control.popleft()
            while self._frames:
                frame = self._frames.popleft()
                self._room.set()
                if not self._frames:
                    self._drained.set()
                if self.subscription.matches(frame):
                    self.last_sent = frame.position
                    return frame.data
            self._wakeup.clear()
            await self._wakeup.wait()

    def close(self, code: int, reason: str) -> None:
        """Ask the connection's shell to close the socket with ``code`` (first ask wins)."""
        if self.kick is None:
            self.kick = Kick(code, reason)
            self._held = None
            # Wake whoever waits for room or a drain: the connection is going anyway.
            self._room.set()
            self._drained.set()
            self._kicked.set()

    async def wait_kicked(self) -> Kick:
        """Wait until :meth:`close` is called."""
        await self._kicked.wait()
        assert self.kick is not None
        return self.kick

    def _push(self, frame: Frame) -> None:
        self._frames.append(frame)
        self.last_position = frame.position
        self._drained.clear()
        self._wakeup.set()

    def _overflow(self) -> None:
        self.close(TOO_SLOW, f"client too slow; reconnect with after={self.last_sent}")


class Hub:
    """Open connections, indexed by user: a user's events go to that user's only."""

    def __init__(self) -> None:
        self._by_user: dict[str, set[Client]] = {}
        # Kept, not counted: every connect and disconnect logs it.
        self._count = 0

    def add(self, client: Client) -> None:
        """Start routing ``client.user_id``'s events to ``client``."""
        clients = self._by_user.setdefault(client.user_id, set())
        if client not in clients:
            clients.add(client)
            self._count += 1

    def remove(self, client: Client) -> None:
        """Stop routing events to ``client``."""
        clients = self._by_user.get(client.user_id)
        if clients is not None and client in clients:
            clients.remove(client)
            self._count -= 1
            if not clients:
                del self._by_user[client.user_id]

    def deliver(self, user_id: str, frame: Frame) -> tuple[int, list[Client]]:
        """Offer ``frame`` to every connection of ``user_id`` without waiting.

        Returns (connections that took it, connections it overflowed: told to close).
        """
        taken, overflowed = 0, []
        for client in self._by_user.get(user_id, ()):
            outcome = client.offer(frame)
            if outcome is Offer.SENT or outcome is Offer.QUEUED:
                taken += 1
            elif outcome is Offer.OVERFLOW:
                overflowed.append(client)
        return taken, overflowed

    def clients(self, user_id: str | None = None) -> Iterator[Client]:
        """Every connection, or ``user_id``'s."""
        if user_id is not None:
            yield from list(self._by_user.get(user_id, ()))
            return
        for clients in list(self._by_user.values()):
            yield from list(clients)

    def __len__(self) -> int:
        return self._count
