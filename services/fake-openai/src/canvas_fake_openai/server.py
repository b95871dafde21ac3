"""``canvas-fake-openai``: an offline, OpenAI-compatible stand-in model
(docs/settings.md, "Stand-in model").

Tests and ``make dev`` without an ``OPENAI_API_KEY`` point ``OPENAI_BASE_URL`` at it
(``http://HOST:PORT/v1``), so the real ``openai`` client is exercised end to end. It
draws a deterministic, plausible flowchart from the prompt: a title, boxes labelled
with the prompt's words, arrows between them (3 to 12 objects, the same prompt always
giving the same drawing), and counts tokens roughly (4 characters a token).

Endpoints:

- ``POST /v1/chat/completions``: non-streaming, or ``"stream": true`` for server-sent
  events (``data: {chat.completion.chunk}`` lines with small pieces of the JSON text,
  then ``data: [DONE]``; with ``"stream_options": {"include_usage": true}`` a last
  chunk with no choices carries the usage, as OpenAI does).
- ``GET /v1/models`` (``canvas-stand-in``), ``GET /health``.

Any ``model`` is accepted; a reply's ``model`` is ``canvas-stand-in``, followed by
`` (asked: NAME)`` when the client asked for another (as OpenAI answers a snapshot's
name, not quite the one asked for), so no result says an OpenAI model drew it.
- ``PUT /_fake/config``: change the knobs below at runtime (JSON, lower-case names
  without the prefix, e.g. ``{"failure_rate": 0.5, "failure_modes": "500,timeout"}``;
  only the keys given change; ``failure_retry_after`` sets the Retry-After seconds of a
  random 429 or 503, 1 by default). ``GET /_fake/config`` shows them.
- ``GET /_fake/stats``: ``calls``, ``streams``, ``failures`` (by mode), ``in_flight``,
  ``max_in_flight`` (most chat calls served at once), ``abandoned`` (calls whose client
  hung up before the answer was complete, streamed or not: an aborted call shows here).
  ``DELETE /_fake/stats`` resets them. ``GET /_fake/requests``: the last 50 request
  bodies received. ``GET /_fake/call-times``: when each chat call arrived (Unix seconds,
  the latest 100,000). ``GET /_fake/calls``: chat calls by user message since start (or the
  last reset), so that a test can tell how often each job's prompt reached the model.
- ``PUT /_fake/gates/NAME``: open gate NAME (see ``gate`` below), for the streams
  waiting at it now and for those that reach it later.

Every wait of a call (``delay_ms``, ``together``, ``timeout``, ``gate``) ends as soon as
the client hangs up, as a real server stops generating then: ``in_flight`` drops at
once, so a test can tell a call that was aborted from one that ran to its end.

A streamed reply comes in pieces of 4 to 16 characters (one to four tokens), so that a
drawing's objects complete one after the other, each over several chunks.

Knobs, from the environment at start:

=============================  ==========================================================
``FAKE_OPENAI_HOST``           address to listen on (``127.0.0.1``)
``FAKE_OPENAI_PORT``           port (``8090``)
``FAKE_OPENAI_DELAY_MS``       wait before answering each call (``0``)
``FAKE_OPENAI_CHUNK_DELAY_MS`` wait between streamed chunks (``0``)
``FAKE_OPENAI_REQUIRE_KEY``    when set, a call whose bearer key differs gets a 401 in
                               OpenAI's error shape
``FAKE_OPENAI_FAILURE_RATE``   share of calls (0..1) that fail on purpose (``0``)
``FAKE_OPENAI_FAILURE_MODES``  how they fail, a comma list drawn from at random
                               (``500,429,garbage``): an HTTP status (``500``, ``503``,
                               ``429`` with Retry-After, ...), ``timeout`` (no answer
                               until the client gives up), ``garbage`` (text that is not
                               JSON), ``empty`` (no valid object), ``cut`` (truncated)
``FAKE_OPENAI_SEED``           seed of the failure draws, for a reproducible run
``LOG_LEVEL``, ``LOG_FORMAT``  as for the services
=============================  ==========================================================

Directives in the user message override the knobs for one call (several may share
brackets, separated by commas: ``[[fake:status=429,retry_after=2]]``):

- ``[[fake:status=N]]``: answer HTTP status N with an OpenAI error body (401 quotes the
  key masked, as OpenAI does; 429 and 503 carry ``Retry-After``, see ``retry_after=S``)
- ``[[fake:garbage]]``: a reply that is not JSON
- ``[[fake:empty]]``: valid JSON holding no valid object
- ``[[fake:invalid=N]]``: N invalid objects mixed into the drawing
- ``[[fake:fence]]``: the reply wrapped in a ```json markdown fence
- ``[[fake:objects=N]]``: exactly N objects (0..500)
- ``[[fake:delay_ms=N]]``, ``[[fake:chunk_delay_ms=N]]``: latency for this call
- ``[[fake:together=N]]``: answer only once N chat calls are in flight at the same
  time (at most MAX_HOLD_SECONDS): proves concurrency without relying on timing
- ``[[fake:timeout]]``: never answer (until the client disconnects)
- ``[[fake:cut]]``: a stream that stops midway without ``[DONE]``; a non-streamed reply
  with its JSON cut in half (``finish_reason: "length"``)
- ``[[fake:error_event]]``: a stream that sends an error event midway
  (``data: {"error": {...}}``, as OpenAI does when it fails after it began) and ends
  there; a non-streamed call gets a 500
- ``[[fake:gate=NAME]]``: a stream that pauses halfway (some objects written, others
  not) until ``PUT /_fake/gates/NAME`` opens the gate (at most MAX_HOLD_SECONDS):
  proves that objects arrive before the reply ends without relying on timing
- ``[[fake:first=N]]``: the failure directives of this message (``status``,
  ``garbage``, ``empty``, ``cut``, ``error_event``, ``timeout``) apply to its first N
  calls only; later calls with the very same message succeed (a retry that works)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from canvas_events.settings import Port

log = structlog.get_logger("canvas_fake_openai")

# The stand-in's own name. It answers whatever model a client asks for (a client
# configured for OpenAI works unchanged), but never reports an OpenAI model's name as
# its own: a result, the page and the CLI show what drew, not what was asked for.
STAND_IN_MODEL = "canvas-stand-in"
DEFAULT_FAILURE_MODES = "500,429,garbage"
# A "timeout" call is held at most this long, so a forgotten client cannot pin it forever.
MAX_HOLD_SECONDS = 600.0
MAX_OBJECTS = 500
_WORD_MODES = {"timeout", "garbage", "empty", "cut"}
_DIRECTIVE = re.compile(r"\[\[fake:([^\]]*)\]\]")
# fmt: off
_STOP_WORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "draw", "diagram", "for", "from", "how",
    "in", "into", "is", "it", "make", "me", "of", "on", "or", "please", "show", "sketch",
    "that", "the", "then", "this", "to", "with",
})
# fmt: on
_FILLS = ("#dbeafe", "#dcfce7", "#fef9c3", "#fde2e4", "#ede9fe", "#e0f2fe")
_STROKES = ("#1e3a8a", "#166534", "#854d0e", "#9f1239", "#5b21b6", "#075985")
_INVALID = (
    {"type": "hexagon", "x": 10, "y": 10, "size": 40},
    {"type": "circle", "x": 10, "y": 10, "radius": -5},
    {"type": "rectangle", "x": 0, "y": 0, "width": 100},
    {"type": "text", "x": 5, "y": 5, "text": ""},
    {"type": "arrow", "points": [[0, 0]]},
    {"type": "rectangle", "x": 0, "y": 0, "width": 10, "height": 10, "fill": "red"},
)
_SERVER_ERROR = "The server had an error while processing your request (fake)."
_GARBAGE = (
    "I'm sorry, but I can only describe this drawing in words: a box on the left, "
    "an arrow, and another box on the right."
)


def _failure_modes(value: str | list[str]) -> str:
    modes = value.split(",") if isinstance(value, str) else value
    cleaned = [mode.strip().lower() for mode in modes if mode.strip()]
    for mode in cleaned:
        if mode not in _WORD_MODES and not (mode.isdigit() and 400 <= int(mode) <= 599):
            raise ValueError(
                f"unknown failure mode {mode!r}: use an HTTP status 400..599, "
                f"or {', '.join(sorted(_WORD_MODES))}"
            )
    return ",".join(cleaned)


class FakeSettings(BaseSettings):
    """The stand-in's knobs, read from FAKE_OPENAI_* (see the module docstring)."""

    model_config = SettingsConfigDict(
        env_prefix="FAKE_OPENAI_", extra="ignore", frozen=True, populate_by_name=True
    )

    host: str = "127.0.0.1"
    port: Port = 8090
    delay_ms: int = Field(default=0, ge=0, le=600_000)
    chunk_delay_ms: int = Field(default=0, ge=0, le=60_000)
    require_key: SecretStr | None = None
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    failure_modes: str = DEFAULT_FAILURE_MODES
    seed: int | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", validation_alias="LOG_LEVEL"
    )
    log_format: Literal["json", "console"] = Field(default="json", validation_alias="LOG_FORMAT")

    @field_validator("require_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value else value

    @field_validator("failure_modes")
    @classmethod
    def _check_modes(cls, value: str) -> str:
        return _failure_modes(value)


class ConfigUpdate(BaseModel):
    """Body of ``PUT /_fake/config``: the knobs to change; the others stay."""

    model_config = ConfigDict(extra="forbid")

    delay_ms: int | None = Field(default=None, ge=0, le=600_000)
    chunk_delay_ms: int | None = Field(default=None, ge=0, le=60_000)
    require_key: str | None = None
    failure_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    failure_modes: str | list[str] | None = None
    failure_retry_after: float | None = Field(default=None, ge=0, le=3_600)
    seed: int | None = None

    @field_validator("failure_modes")
    @classmethod
    def _check_modes(cls, value: str | list[str] | None) -> str | None:
        return None if value is None else _failure_modes(value)


@dataclass
class FakeConfig:
    """The knobs in force now."""

    delay_ms: int = 0
    chunk_delay_ms: int = 0
    require_key: str | None = None
    failure_rate: float = 0.0
    failure_modes: list[str] = field(default_factory=lambda: DEFAULT_FAILURE_MODES.split(","))
    # Retry-After of a random 429 or 503 (None: 1 s).
    failure_retry_after: float | None = None

    @classmethod
    def from_settings(cls, settings: FakeSettings) -> FakeConfig:
        """The knobs given by the environment."""
        return cls(
            delay_ms=settings.delay_ms,
            chunk_delay_ms=settings.chunk_delay_ms,
            require_key=settings.require_key.get_secret_value() if settings.require_key else None,
            failure_rate=settings.failure_rate,
            failure_modes=[m for m in settings.failure_modes.split(",") if m],
        )

    def public(self) -> dict[str, Any]:
        """The knobs as JSON, without the key itself."""
        return {
            "delay_ms": self.delay_ms,
            "chunk_delay_ms": self.chunk_delay_ms,
            "require_key": self.require_key is not None,
            "failure_rate": self.failure_rate,
            "failure_modes": self.failure_modes,
            "failure_retry_after": self.failure_retry_after,
        }


# Arrival times kept for GET /_fake/call-times: enough for a test's or a bench's window.
_KEPT_CALL_TIMES = 100_000


@dataclass
class Stats:
    """What the stand-in has served since start (or the last reset)."""

    calls: int = 0
    streams: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    abandoned: int = 0
    # Chat calls by user message (each test job's prompt is its own).
    by_prompt: Counter[str] = field(default_factory=Counter)
    # When each chat call arrived (Unix seconds), the latest _KEPT_CALL_TIMES.
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=_KEPT_CALL_TIMES))

    def enter(self) -> None:
        """A chat call begins."""
        self.arrivals.append(time.time())
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        """A chat call ended (answered, failed or abandoned)."""
        self.in_flight -= 1

    def public(self) -> dict[str, Any]:
        """The counters as JSON."""
        return {
            "calls": self.calls,
            "streams": self.streams,
            "failures": dict(self.failures),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "abandoned": self.abandoned,
        }


@dataclass
class Directives:
    """Per-call overrides written into the user message as ``[[fake:...]]``."""

    status: int | None = None
    retry_after: float | None = None
    garbage: bool = False
    empty: bool = False
    invalid: int = 0
    fence: bool = False
    objects: int | None = None
    delay_ms: int | None = None
    chunk_delay_ms: int | None = None
    together: int = 0
    timeout: bool = False
    cut: bool = False
    error_event: bool = False
    gate: str | None = None
    first: int | None = None

    def succeed(self) -> None:
        """Drop the failure directives (what ``first=N`` does after N calls)."""
        self.status = None
        self.garbage = self.empty = self.timeout = self.cut = self.error_event = False


def parse_directives(text: str) -> tuple[Directives, str]:
    """The directives in ``text`` and the text without them; a malformed one is ignored."""
    found = Directives()
    for group in _DIRECTIVE.findall(text):
        for item in group.split(","):
            name, _, value = item.strip().partition("=")
            name = name.strip().lower()
            with contextlib.suppress(ValueError):
                if name in ("garbage", "empty", "fence", "timeout", "cut", "error_event"):
                    setattr(found, name, True)
                elif name in (
                    "status",
                    "invalid",
                    "delay_ms",
                    "chunk_delay_ms",
                    "together",
                    "first",
                ):
                    setattr(found, name, max(0, int(value)))
                elif name == "gate" and value.strip():
                    found.gate = value.strip()
                elif name == "objects":
                    found.objects = min(max(0, int(value)), MAX_OBJECTS)
                elif name == "retry_after":
                    found.retry_after = max(0.0, float(value))
    return found, " ".join(_DIRECTIVE.sub(" ", text).split())


def reported_model(asked: str) -> str:
    """The ``model`` of a reply: the stand-in's name, with the model asked for beside it
    when that was another (``canvas-stand-in (asked: gpt-4o-mini)``)."""
    return STAND_IN_MODEL if asked == STAND_IN_MODEL else f"{STAND_IN_MODEL} (asked: {asked})"


def _words(topic: str) -> list[str]:
    words = re.findall(r"[^\W\d_][\w'\-]*", topic)
    return [w for w in words if len(w) > 2 and w.lower() not in _STOP_WORDS]


_WIDTH, _HEIGHT, _PER_COLUMN = 200, 70, 5


def draw(topic: str, count: int | None = None) -> list[dict[str, Any]]:
    """A flowchart about ``topic``: a title, then boxes joined by arrows, laid out in
    columns of five. The same topic always gives the same drawing; ``count`` objects
    exactly when given, else 3 to 12. Every box after the first has an arrow to it: where
    one object is left and a box would have none, a caption takes its place."""
    rng = random.Random(hashlib.sha256(topic.encode()).digest())
    if count is None:
        count = rng.randint(3, 12)
    words = _words(topic)
    title = (topic[:1].upper() + topic[1:])[:80] if topic else "Untitled drawing"
    labels = ["Start", *(w.capitalize() for w in words[:8]), "Done"]
    fill, stroke = rng.randrange(len(_FILLS)), _STROKES[rng.randrange(len(_STROKES))]
    objects: list[dict[str, Any]] = [
        {"type": "text", "x": 80, "y": 30, "text": title, "font_size": 24, "stroke": "#111827"}
    ]
    boxes: list[tuple[float, float]] = []
    while len(objects) < count:
        node = len(boxes)
        if node > 0 and count - len(objects) == 1:  # no room for a box and its arrow
            x, y = boxes[-1]
            caption = f"{node} steps" if node > 1 else "1 step"
            objects.append({"type": "text", "x": x, "y": y + _HEIGHT + 24, "text": caption,
                            "font_size": 14, "stroke": "#6b7280"})  # fmt: skip
            break
        column, row = divmod(node, _PER_COLUMN)
        boxes.append((80 + column * 320, 100 + row * 130))
        label = labels[node] if node < len(labels) else f"Step {node + 1}"
        last = node == len(labels) - 1
        shape = _node_shape(boxes[-1], first_or_last=node == 0 or last, rng=rng)
        shape.update(
            text=label, fill=_FILLS[(fill + node) % len(_FILLS)], stroke=stroke, stroke_width=2
        )
        objects.append(shape)
        if node > 0:
            objects.append(_arrow(boxes[-2], boxes[-1], stroke))
    return objects[:count]


def _node_shape(
    where: tuple[float, float], *, first_or_last: bool, rng: random.Random
) -> dict[str, Any]:
    """A circle for the first and last node, else a rectangle (or now and then a sticky
    note) of the box at ``where``."""
    x, y = where
    if first_or_last:
        return {"type": "circle", "x": x + _WIDTH / 2, "y": y + _HEIGHT / 2, "radius": _HEIGHT / 2}
    kind = "sticky_note" if rng.random() < 0.2 else "rectangle"
    return {"type": kind, "x": x, "y": y, "width": _WIDTH, "height": _HEIGHT}


def _arrow(
    previous: tuple[float, float], following: tuple[float, float], stroke: str
) -> dict[str, Any]:
    """An arrow from the box at ``previous`` to the box at ``following``: from the bottom
    of one to the top of the next in a column, else from the right side across."""
    (px, py), (nx, ny) = previous, following
    if nx == px:
        points = [[px + _WIDTH / 2, py + _HEIGHT], [nx + _WIDTH / 2, ny]]
    else:
        points = [[px + _WIDTH, py + _HEIGHT / 2], [nx, ny + _HEIGHT / 2]]
    return {"type": "arrow", "points": points, "stroke": stroke, "stroke_width": 2}


def reply_text(topic: str, directives: Directives) -> str:
    """The assistant's message content for one call."""
    if directives.garbage:
        return _GARBAGE
    if directives.empty:
        return json.dumps({"objects": []})
    objects: list[Any] = draw(topic, directives.objects)
    for k in range(directives.invalid):
        objects.insert(min(len(objects), 1 + 2 * k), _INVALID[k % len(_INVALID)])
    text = json.dumps({"objects": objects}, separators=(", ", ": "))
    if directives.fence:
        text = f"```json\n{text}\n```"
    return text


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _user_text(messages: list[Any]) -> str:
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
    return "\n".join(parts)


def _prompt_tokens(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        # About 4 tokens of framing per message, as OpenAI counts them.
        total += 4 + (_tokens(content) if isinstance(content, str) else 0)
    return total


def _masked(key: str) -> str:
    return f"{key[:3]}{'*' * max(0, len(key) - 7)}{key[-4:]}" if len(key) > 8 else "***"


def error_response(
    status: int,
    *,
    model: str = "",
    key: str | None = None,
    retry_after: float | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind, code = "invalid_request_error", None
    if status == 401:
        message = (
            f"Incorrect API key provided: {_masked(key)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
            if key
            else "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        code = "invalid_api_key"
    elif status == 400:
        message = "Invalid request (fake): the stand-in was asked to refuse it."
    elif status == 403:
        message, kind = "You are not allowed to sample from this model (fake).", "permission_error"
    elif status == 404:
        message = f"The model `{model}` does not exist or you do not have access to it."
        code = "model_not_found"
    elif status == 429:
        message, kind = "Rate limit reached (fake). Please try again shortly.", "requests"
        code = "rate_limit_exceeded"
    elif status >= 500:
        message, kind = _SERVER_ERROR, "server_error"
    else:
        message = f"The stand-in answered {status} on purpose."
    headers: dict[str, str] = {}
    if status in (429, 503) or retry_after is not None:
        seconds = 1.0 if retry_after is None else retry_after
        headers["retry-after"] = f"{seconds:g}"
        headers["retry-after-ms"] = str(round(seconds * 1000))
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
        headers=headers,
    )


class FakeModel:
    """The stand-in's state: knobs, counters and the last requests."""

    def __init__(self, config: FakeConfig, seed: int | None = None) -> None:
        self.config = config
        self.stats = Stats()
        self.requests: deque[dict[str, Any]] = deque(maxlen=50)
        self._rng = random.Random(seed)
        self._seq = 0
        # For each call in flight: the most calls in flight at once since it arrived.
        self._peaks: dict[int, int] = {}
        self._waiting: dict[int, tuple[int, asyncio.Event]] = {}
        # Open or awaited gates, by name; calls so far of each message with ``first=N``.
        # Both only grow, by what tests write: fine for a test double.
        self.gates: dict[str, asyncio.Event] = {}
        self.calls_of: Counter[str] = Counter()

    def update(self, change: ConfigUpdate) -> None:
        """Apply ``PUT /_fake/config``."""
        given = change.model_fields_set
        if "delay_ms" in given and change.delay_ms is not None:
            self.config.delay_ms = change.delay_ms
        if "chunk_delay_ms" in given and change.chunk_delay_ms is not None:
            self.config.chunk_delay_ms = change.chunk_delay_ms
        if "require_key" in given:
            self.config.require_key = change.require_key or None
        if "failure_rate" in given and change.failure_rate is not None:
            self.config.failure_rate = change.failure_rate
        if "failure_modes" in given and isinstance(change.failure_modes, str):
            self.config.failure_modes = [m for m in change.failure_modes.split(",") if m]
        if "failure_retry_after" in given:
            self.config.failure_retry_after = change.failure_retry_after
        if "seed" in given:
            self._rng = random.Random(change.seed)

    def reset(self) -> None:
        """Forget the counters and the requests seen."""
        self.stats = Stats()
        self.requests.clear()

    def arrived(self) -> int:
        """A chat call came in: count it, release the calls waiting for company, and
        return the call's ticket."""
        self.stats.enter()
        self._seq += 1
        self._peaks[self._seq] = 0
        # Peaks are taken at arrivals, the only moments the count grows: a check made
        # later, when a waiter runs again, could miss a call that came and went.
        for ticket in self._peaks:
            self._peaks[ticket] = max(self._peaks[ticket], self.stats.in_flight)
        for ticket, (count, event) in self._waiting.items():
            if self._peaks[ticket] >= count:
                event.set()
        return self._seq

    def left(self, ticket: int) -> None:
        """The call with ``ticket`` ended (answered, failed or abandoned)."""
        self.stats.leave()
        self._peaks.pop(ticket, None)

    async def wait_together(self, ticket: int, count: int) -> None:
        """Return once ``count`` chat calls were in flight at the same time, this one
        among them (or after MAX_HOLD_SECONDS)."""
        if self._peaks.get(ticket, 0) >= count:
            return
        event = asyncio.Event()
        self._waiting[ticket] = (count, event)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MAX_HOLD_SECONDS):
                    await event.wait()
        finally:
            del self._waiting[ticket]

    def gate(self, name: str) -> asyncio.Event:
        """Gate ``name``: set once it is opened."""
        return self.gates.setdefault(name, asyncio.Event())

    def stream_ended(self, ticket: int, finished: bool) -> None:
        """A streamed call ended; ``finished`` when it sent all it meant to send."""
        if not finished:
            self.stats.abandoned += 1
            log.info("streamed chat call abandoned by the client")
        self.left(ticket)

    def draw_failure(self, directives: Directives) -> None:
        """Turn a random failure (FAILURE_RATE, FAILURE_MODES) into this call's directives."""
        config = self.config
        if directives.status is not None or not config.failure_modes:
            return
        if config.failure_rate <= 0 or self._rng.random() >= config.failure_rate:
            return
        mode = self._rng.choice(config.failure_modes)
        if mode.isdigit():
            directives.status = int(mode)
            if directives.retry_after is None:
                directives.retry_after = config.failure_retry_after
        else:
            setattr(directives, mode, True)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _refused(model: FakeModel, request: Request) -> JSONResponse | None:
    """A 401 when a key is required (``require_key``) and the call does not bear it."""
    required = model.config.require_key
    if required is None:
        return None
    key = _bearer(request)
    if key == required:
        return None
    model.stats.failures["401"] += 1
    return error_response(401, key=key)


def create_app(model: FakeModel) -> FastAPI:
    """The stand-in's FastAPI app."""
    app = FastAPI(title="canvas-jobs fake OpenAI", docs_url=None, redoc_url=None)
    _add_openai_routes(app, model)
    _add_fake_routes(app, model)
    return app


def _add_openai_routes(app: FastAPI, model: FakeModel) -> None:
    """``/health``, and what OpenAI serves: ``/v1/models``, ``/v1/chat/completions``."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=None)
    async def models(request: Request) -> JSONResponse | dict[str, Any]:
        refused = _refused(model, request)
        if refused is not None:
            return refused
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "canvas-jobs"}
                for name in (STAND_IN_MODEL,)
            ],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        ticket = model.arrived()
        try:
            response = await _chat(model, request, ticket)
        except BaseException:
            model.left(ticket)
            raise
        if isinstance(response, _Stream):
            return response  # the stream leaves when it ends
        model.left(ticket)
        return response


def _add_fake_routes(app: FastAPI, model: FakeModel) -> None:
    """``/_fake/...``: the knobs, the counters, the requests seen, the gates."""

    @app.get("/_fake/config")
    async def get_config() -> dict[str, Any]:
        return model.config.public()

    @app.put("/_fake/config")
    async def put_config(change: ConfigUpdate) -> dict[str, Any]:
        model.update(change)
        log.info("fake config changed", **model.config.public())
        return model.config.public()

    @app.get("/_fake/stats")
    async def get_stats() -> dict[str, Any]:
        return model.stats.public()

    @app.delete("/_fake/stats")
    async def reset_stats() -> dict[str, Any]:
        in_flight = model.stats.in_flight
        model.reset()
        # Calls still running will leave: keep the count right for them.
        model.stats.in_flight = in_flight
        return model.stats.public()

    @app.get("/_fake/calls")
    async def get_calls() -> dict[str, int]:
        return dict(model.stats.by_prompt)

    @app.get("/_fake/call-times")
    async def get_call_times() -> dict[str, list[float]]:
        return {"arrivals": list(model.stats.arrivals)}

    @app.put("/_fake/gates/{name}")
    async def open_gate(name: str) -> dict[str, Any]:
        model.gate(name).set()
        return {"gate": name, "open": True}

    @app.get("/_fake/requests")
    async def get_requests() -> list[dict[str, Any]]:
        return list(model.requests)


async def _chat(model: FakeModel, request: Request, ticket: int) -> Response:
    """One chat call: refused, held, failed on purpose, or answered (streamed or whole)."""
    refused = _refused(model, request)
    if refused is not None:
        return refused
    body = await _chat_body(request)
    if body is None:
        model.stats.failures["400"] += 1
        return _missing_fields()
    model.requests.append(body)
    user_text = _user_text(body["messages"])
    model.stats.by_prompt[user_text] += 1
    directives, topic = _directives(model, user_text)
    if not await _wait(model, request, ticket, directives):
        model.stats.abandoned += 1
        log.info("chat call abandoned by the client")
        # Nobody reads this answer: the client is gone.
        return Response(status_code=499)
    failure = _failure(model, request, body, directives)
    if failure is not None:
        return failure
    return _reply(model, ticket, body, directives, topic)


async def _chat_body(request: Request) -> dict[str, Any] | None:
    """The request's JSON body, if it names a model and has messages."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    messages = body.get("messages") if isinstance(body, dict) else None
    model_name = body.get("model") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages or not isinstance(model_name, str):
        return None
    assert isinstance(body, dict)
    return body


def _missing_fields() -> JSONResponse:
    """The 400 for a body without its model or messages, in OpenAI's error shape."""
    return JSONResponse(
        {
            "error": {
                "message": "'model' (a string) and 'messages' (a non-empty list) are required",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
        status_code=400,
    )


def _directives(model: FakeModel, user_text: str) -> tuple[Directives, str]:
    """The call's directives, with ``first=N`` and a random failure applied, and its topic."""
    directives, topic = parse_directives(user_text)
    if directives.first is not None:
        model.calls_of[user_text] += 1
        if model.calls_of[user_text] > directives.first:
            directives.succeed()
    model.draw_failure(directives)
    return directives, topic


async def _wait(model: FakeModel, request: Request, ticket: int, directives: Directives) -> bool:
    """Wait as the call asks (``together``, ``delay_ms``, ``timeout``); False as soon as
    the client hangs up."""
    config = model.config
    delay_ms = config.delay_ms if directives.delay_ms is None else directives.delay_ms
    if directives.timeout:
        model.stats.failures["timeout"] += 1
    waits: list[Awaitable[None]] = []
    if directives.together:
        waits.append(model.wait_together(ticket, directives.together))
    if delay_ms:
        waits.append(asyncio.sleep(delay_ms / 1000))
    if directives.timeout:
        waits.append(_hold())
    for wait in waits:
        if not await _unless_client_gone(request, wait):
            return False
    return True


def _failure(
    model: FakeModel, request: Request, body: dict[str, Any], directives: Directives
) -> JSONResponse | None:
    """The error the call asks for (timeout, status, an error event in a whole reply), if
    any; else None, once the failures the reply itself carries are counted."""
    if directives.timeout:
        return error_response(504)
    if directives.error_event and not body.get("stream"):
        directives.status = 500  # a whole reply has no middle to fail in
    if directives.status is not None and directives.status >= 400:
        model.stats.failures[str(directives.status)] += 1
        return error_response(
            directives.status,
            model=body["model"],
            key=_bearer(request),
            retry_after=directives.retry_after,
        )
    for mode in ("garbage", "empty", "cut", "error_event"):
        if getattr(directives, mode):
            model.stats.failures[mode] += 1
    return None


def _reply(
    model: FakeModel, ticket: int, body: dict[str, Any], directives: Directives, topic: str
) -> Response:
    """The completion: streamed when the body asks for it, else whole."""
    text = reply_text(topic, directives)
    usage = {
        "prompt_tokens": _prompt_tokens(body["messages"]),
        "completion_tokens": _tokens(text),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    completion_id = f"chatcmpl-fake{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.get("stream"):
        reported = reported_model(body["model"])
        return _whole_reply(text, directives.cut, completion_id, created, reported, usage)
    model.stats.streams += 1
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    chunk_delay_ms = (
        model.config.chunk_delay_ms
        if directives.chunk_delay_ms is None
        else directives.chunk_delay_ms
    )
    stream = _stream(
        text,
        completion_id=completion_id,
        created=created,
        model_name=reported_model(body["model"]),
        usage=usage if include_usage else None,
        chunk_delay=chunk_delay_ms / 1000,
        cut=directives.cut,
        error=directives.error_event,
        gate=model.gate(directives.gate) if directives.gate else None,
        seed=topic,
    )
    return _Stream(stream, functools.partial(model.stream_ended, ticket))


def _whole_reply(
    text: str,
    cut: bool,
    completion_id: str,
    created: int,
    model_name: str,
    usage: dict[str, int],
) -> JSONResponse:
    """A chat.completion; with ``cut``, its JSON cut in half (``finish_reason: "length"``)."""
    finish_reason = "stop"
    if cut:
        text, finish_reason = text[: len(text) // 2], "length"
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "system_fingerprint": "fp_canvas_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
    )


async def _hold() -> None:
    """Answer nothing for MAX_HOLD_SECONDS (the client hangs up long before)."""
    await asyncio.sleep(MAX_HOLD_SECONDS)


async def _client_gone(request: Request) -> None:
    """Return when the client hangs up."""
    # The body was read already: the next ASGI message is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_gone(request: Request, wait: Awaitable[None]) -> bool:
    """Run ``wait``; False (and ``wait`` cancelled) if the client hung up first."""
    waiting = asyncio.ensure_future(wait)
    watching = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, watching):
            task.cancel()
        await asyncio.gather(waiting, watching, return_exceptions=True)
    return not (watching.done() and not watching.cancelled())


def _pieces(text: str, seed: str) -> list[str]:
    """``text`` in pieces of 4 to 16 characters, about one to four tokens each; the same
    seed always cuts the same text the same way."""
    rng = random.Random(seed)
    pieces: list[str] = []
    start = 0
    while start < len(text):
        size = rng.randint(4, 16)  # about one to four tokens
        pieces.append(text[start : start + size])
        start += size
    return pieces


def _delta(content: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
    """The ``choices`` of a chunk carrying ``content``."""
    return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}]


def _error_event() -> bytes:
    """The event OpenAI sends when it fails after the stream began."""
    failure = {
        "message": _SERVER_ERROR,
        "type": "server_error",
        "param": None,
        "code": None,
    }
    return f"data: {json.dumps({'error': failure})}\n\n".encode()


async def _stream(
    text: str,
    *,
    completion_id: str,
    created: int,
    model_name: str,
    usage: dict[str, int] | None,
    chunk_delay: float,
    cut: bool,
    gate: asyncio.Event | None,
    seed: str,
    error: bool = False,
) -> AsyncIterator[bytes]:
    """Server-sent events of chat.completion.chunk objects, OpenAI's way."""

    def event(choices: list[dict[str, Any]], chunk_usage: dict[str, int] | None = None) -> bytes:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "system_fingerprint": "fp_canvas_fake",
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = chunk_usage
        return f"data: {json.dumps(chunk)}\n\n".encode()

    # A piece's event is the same bytes as event(_delta({"content": piece})), made from
    # a template around the piece's JSON string: a whole chunk's json.dumps each time
    # was a sixth of the stand-in's CPU with 1,000 streams (make bench SCENARIO=10s).
    head, _, tail = event(_delta({"content": ""})).partition(b'"content": ""')
    head += b'"content": '

    def piece_event(piece: str) -> bytes:
        return head + json.dumps(piece).encode() + tail

    pieces = _pieces(text, seed)
    yield event(_delta({"role": "assistant", "content": "", "refusal": None}))
    for number, piece in enumerate(pieces):
        if cut and number >= len(pieces) // 2:
            return  # the connection drops: no finish_reason, no [DONE]
        if error and number >= len(pieces) // 2:
            # The provider gives up midway: an error event, then the stream ends.
            yield _error_event()
            return
        if gate is not None and number == len(pieces) // 2:
            # Starlette cancels this generator if the client hangs up meanwhile.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MAX_HOLD_SECONDS):
                    await gate.wait()
        if chunk_delay:
            await asyncio.sleep(chunk_delay)
        yield piece_event(piece)
    yield event(_delta({}, "stop"))
    if usage is not None:
        yield event([], usage)
    yield b"data: [DONE]\n\n"


class _Stream(StreamingResponse):
    """A streamed reply that tells when it is over, and whether it sent all it meant to,
    even when the client hung up before its first chunk (a generator that never started
    runs no ``finally``)."""

    def __init__(self, content: AsyncIterator[bytes], on_end: Callable[[bool], None]) -> None:
        self._finished = False
        super().__init__(
            self._watch(content),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )
        self._on_end = on_end

    async def _watch(self, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in content:
            yield chunk
        self._finished = True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end(self._finished)
