"""Follow one job until it ends: the gateway's record first, then the notifier live.

Order of work, so that nothing is missed and nothing shown twice:

1. ``submit --watch`` opens the WebSocket *before* posting the job: a connection
   without ``after`` starts live, so every frame of the new job reaches it.
2. The job's recorded events are read from the gateway and applied (a finished job
   ends here, at once).
3. The WebSocket (opened now with ``after`` = the last recorded position, when there is
   one: the notifier replays from there without gap) is narrowed to the job with a
   ``subscribe`` message, and its frames are applied as they come.
4. Whenever the socket is silent for :data:`POLL_SECONDS` (longer while the silence
   lasts), the recorded events are read again: this closes the one window the live
   stream cannot (the notifier places a new connection at its head asynchronously).
   While the notifier cannot be reached, the gateway is polled instead, and the
   notifier tried again, every :data:`RECONNECT_DELAYS` (0.5 s, doubling up to 5 s).
   A dropped connection reconnects with ``after`` = the last position seen.

Frames carry commit-ordered positions, so :meth:`JobView.apply` drops whatever is at
or below the last one applied, whichever source brought it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import websockets
from rich.console import Console
from rich.live import Live
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from canvas_cli.api import Gateway
from canvas_cli.config import websocket_url
from canvas_cli.errors import CliError
from canvas_cli.render import live_panel
from canvas_cli.view import JobView, canvas_of, describe_frame, frame_from_event

# Seconds of silence on the socket before the gateway is asked, doubling while the
# silence lasts up to MAX_POLL_SECONDS (a job waiting minutes for its retry costs a
# request every half minute, not every two seconds); any frame starts again from here.
POLL_SECONDS: Final = 2.0
MAX_POLL_SECONDS: Final = 30.0
# Seconds between attempts to reconnect to the notifier (and polls of the gateway
# meanwhile), doubling from the first up to the second.
RECONNECT_DELAYS: Final = (0.5, 5.0)
OPEN_TIMEOUT: Final = 10.0
# Close codes of the notifier (canvas_notifier.hub) that reconnecting cannot fix.
UNAUTHORIZED: Final = 4401
BAD_REQUEST: Final = 4400


class Sink(Protocol):
    """Where a watch shows what happens."""

    def frame(self, view: JobView, frame: dict[str, Any]) -> None:
        """``frame`` was just applied to ``view``."""

    def connection(self, view: JobView, connected: bool, reason: str | None = None) -> None:
        """The live stream was lost (``connected`` False) or is back."""

    def close(self, view: JobView) -> None:
        """The watch is over (the job ended, or the watch stopped); nothing by default."""
        return


def warn_polling(err: Console, reason: str | None) -> None:
    """Say on stderr that the watch lost its live stream and polls instead."""
    because = f" ({reason})" if reason else ""
    err.print(
        f"canvas-jobs: warning: live updates unavailable{because}; polling the gateway",
        markup=False,
    )


class LinesSink(Sink):
    """One line per frame: for pipes, logs and tests (stdout not a terminal)."""

    def __init__(self, out: Console, err: Console) -> None:
        self.out, self.err = out, err

    def frame(self, view: JobView, frame: dict[str, Any]) -> None:
        self.out.print(describe_frame(frame), markup=False, highlight=False)

    def connection(self, view: JobView, connected: bool, reason: str | None = None) -> None:
        if connected:
            self.err.print("canvas-jobs: live updates are back", markup=False)
        else:
            warn_polling(self.err, reason)


class JsonSink(Sink):
    """Each of the job's frames as one JSON line, exactly as the notifier sends them."""

    def __init__(self, err: Console) -> None:
        self.err = err

    def frame(self, view: JobView, frame: dict[str, Any]) -> None:
        print(json.dumps(frame, separators=(",", ":")), flush=True)

    def connection(self, view: JobView, connected: bool, reason: str | None = None) -> None:
        if not connected:
            warn_polling(self.err, reason)


class LiveSink:
    """A live panel redrawn in place (stdout is a terminal)."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.connected = True
        self._live: Live | None = None

    def _draw(self, view: JobView) -> None:
        panel = live_panel(view, connected=self.connected)
        if self._live is None:
            self._live = Live(panel, console=self.out, refresh_per_second=8)
            self._live.start()
        else:
            self._live.update(panel)

    def start(self, view: JobView) -> None:
        """Draw the panel before the first frame."""
        self._draw(view)

    def frame(self, view: JobView, frame: dict[str, Any]) -> None:
        self._draw(view)

    def connection(self, view: JobView, connected: bool, reason: str | None = None) -> None:
        self.connected = connected
        self._draw(view)

    def close(self, view: JobView) -> None:
        if self._live is not None:
            self._live.update(live_panel(view, connected=self.connected))
            self._live.stop()
            self._live = None


async def open_stream(notifier_url: str, token: str, after: int | None = None) -> ClientConnection:
    """A WebSocket to the notifier, the token in the Authorization header (never in
    the URL). Raises :class:`CliError` (never with the token in it)."""
    url = websocket_url(notifier_url, after)
    try:
        return await websockets.connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=OPEN_TIMEOUT,
            # Frames are small; the biggest, a completion, lists up to 500 object ids.
            max_size=4 * 1024 * 1024,
        )
    except InvalidStatus as exc:
        raise CliError(
            f"the notifier at {notifier_url} refused the WebSocket "
            f"(HTTP {exc.response.status_code})"
        ) from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise CliError(
            f"cannot reach the notifier at {notifier_url}: {exc or type(exc).__name__}"
        ) from None


@dataclass(eq=False)
class Follower:
    """Follows one job to its end (see the module's docstring)."""

    gateway: Gateway
    notifier_url: str
    token: str = field(repr=False)
    view: JobView
    sink: Sink
    # The highest position the socket delivered, of any job: where a reconnect resumes.
    _stream_position: int | None = field(init=False, default=None)
    connected: bool = field(init=False, default=True)

    async def connect(self, after: int | None = None) -> ClientConnection | None:
        """A new notifier connection, or None (the watch then polls the gateway)."""
        try:
            return await open_stream(self.notifier_url, self.token, after)
        except CliError as exc:
            self._lost(exc.message)
            return None

    def _lost(self, reason: str) -> None:
        if self.connected:
            self.connected = False
            self.sink.connection(self.view, False, reason)

    def _back(self) -> None:
        if not self.connected:
            self.connected = True
            self.sink.connection(self.view, True)

    def _resume_after(self) -> int | None:
        positions = [p for p in (self._stream_position, self.view.last_position) if p is not None]
        return max(positions) if positions else None

    async def catch_up(self) -> None:
        """Apply the job's recorded events not applied yet."""
        events = await self.gateway.events(self.view.job_id)
        if self.view.canvas_id is None:
            self.view.canvas_id = canvas_of(events)
        for event in events:
            frame = frame_from_event(self.view.job_id, self.view.canvas_id, event)
            if frame is not None:
                self._apply(frame)

    def _apply(self, frame: dict[str, Any]) -> None:
        if self.view.apply(frame):
            self.sink.frame(self.view, frame)

    def _receive(self, raw: str | bytes) -> None:
        try:
            frame = json.loads(raw)
        except ValueError:
            return  # not a frame of the protocol: nothing to show
        if not isinstance(frame, dict):
            return
        position = frame.get("position")
        if isinstance(position, int):
            self._stream_position = max(self._stream_position or 0, position)
        self._apply(frame)

    async def _subscribe(self, ws: ClientConnection) -> None:
        # Narrows the stream to this job; frames of other jobs that come before the
        # answer are filtered here anyway.
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"type": "subscribe", "job_id": self.view.job_id}))

    async def run(self, ws: ClientConnection | None = None) -> JobView:
        """Follow the job until it ends; ``ws`` is a connection opened before the job
        was submitted (None: open one here, after the recorded events)."""
        try:
            await self.catch_up()
            if self.view.outcome is None:
                if ws is None:
                    ws = await self.connect(self._resume_after())
                if ws is not None:
                    self._back()
                    await self._subscribe(ws)
                await self._follow(ws)
        finally:
            if ws is not None:
                await ws.close()
            self.sink.close(self.view)
        return self.view

    async def _follow(self, ws: ClientConnection | None) -> None:
        delay = RECONNECT_DELAYS[0]
        silence = POLL_SECONDS
        while self.view.outcome is None:
            if ws is None:
                await asyncio.sleep(delay)
                await self.catch_up()
                if self.view.outcome is not None:
                    return
                ws = await self.connect(self._resume_after())
                if ws is None:
                    delay = min(delay * 2, RECONNECT_DELAYS[1])
                    continue
                delay = RECONNECT_DELAYS[0]
                await self._subscribe(ws)
                self._back()
                # Anything recorded while the socket was away came in the replay.
                continue
            try:
                async with asyncio.timeout(silence):
                    raw = await ws.recv()
            except TimeoutError:
                silence = min(silence * 2, MAX_POLL_SECONDS)
                # The socket is the main source: a gateway blip here is not fatal.
                with contextlib.suppress(CliError):
                    await self.catch_up()
                continue
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                if code == UNAUTHORIZED:
                    raise CliError(
                        f"the notifier refused the token: {reason or 'invalid or expired'}",
                        hint="check CANVAS_TOKEN or --token",
                    ) from None
                if code == BAD_REQUEST:
                    raise CliError(f"the notifier refused the request: {reason}") from None
                ws = None
                self._lost(f"connection closed ({code}{': ' + reason if reason else ''})")
                await self.catch_up()
                continue
            silence = POLL_SECONDS
            self._receive(raw)
