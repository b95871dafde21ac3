"""One chat completion call to an OpenAI-compatible model, streamed or not.

Streamed (OPENAI_STREAM, the default), the reply's text is handed to ``on_text`` piece
by piece as it arrives, and the call is complete only when the model said why it
stopped (a ``finish_reason``): a stream that ends without one was cut off, whatever
the text holds so far, and fails retryable. The whole call, streamed or not, is
bounded by OPENAI_TIMEOUT_SECONDS (the ``openai`` client's own timeout bounds each
read only, and a slow stream reads often).

A streamed call is sent by the ``openai`` client (key, base URL, timeout, no retries,
an error status raised as its ``APIStatusError``), but its body is read here: the
client would build a pydantic model of every chunk, about 100 of them a reply, and that
was half of the generator's CPU. :mod:`canvas_generator.sse` splits the events, orjson
parses each, and only the fields used below are read. What breaks the read is raised as
the client raised it (``APITimeoutError``, ``APIConnectionError``, ``APIError`` for an
error event), so :func:`~canvas_generator.errors.classify` reads it as before.

Each call is a client span (``chat <model>``, OpenTelemetry's GenAI attributes: model,
tokens, finish reason) when traces are on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import openai
import orjson
from openai._vendor.httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions
from openai.types.chat import ChatCompletionMessageParam
from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming
from opentelemetry.trace import Span, SpanKind

from canvas_events import tracing
from canvas_generator import connections
from canvas_generator.errors import (
    AttemptFailed,
    BadOutput,
    MissingApiKey,
    broke_off,
    classify,
    lost_connection,
)
from canvas_generator.metrics import Metrics
from canvas_generator.settings import Settings
from canvas_generator.sse import EventStream

# Called with each piece of the reply's text as it arrives; what it raises ends the call
# and reaches the caller unchanged.
TextSink = Callable[[str], None]

# A read of the body that fails with one of these is the connection breaking, as the
# openai client's own stream takes them (TLS failures that httpx2 does not map yet
# included); a timeout among them is a timeout.
_CONNECTION_ERRORS = (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream)
# After [DONE], how long the rest of the body (normally only its end) may take to come:
# read to its end, the connection goes back to the pool for the next call.
_DRAIN_SECONDS = 0.1
_TOKEN_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(frozen=True)
class Completion:
    """What the model answered, and what it cost."""

    text: str
    model: str
    usage: dict[str, int]
    latency_ms: int
    finish_reason: str | None


@dataclass(eq=False, kw_only=True)
class ModelClient:
    """The ``openai`` client, made on first use: no network call and no key check happen
    at start, so the service starts (and says so in /ready) without either."""

    api_key: str | None = field(repr=False)
    base_url: str | None
    model: str
    timeout_seconds: float
    stream: bool = True
    metrics: Metrics = field(default_factory=Metrics)
    _client: openai.AsyncOpenAI | None = field(init=False, default=None)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> ModelClient:
        """A client configured by OPENAI_* settings."""
        return cls(
            api_key=settings.api_key,
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            timeout_seconds=settings.openai_timeout_seconds,
            stream=settings.openai_stream,
            metrics=metrics if metrics is not None else Metrics(),
        )

    def _openai(self) -> openai.AsyncOpenAI:
        if self.api_key is None:
            raise MissingApiKey()
        if self._client is None:
            self._client = openai.AsyncOpenAI(
                api_key=self.api_key,
                base_url=self.base_url,
                timeout=self.timeout_seconds,
                # Every attempt is one call, visible in the job's history and retried by
                # the orchestrator's backoff (docs/settings.md, MAX_JOB_RETRIES).
                max_retries=0,
                # The openai client's aiohttp transport (its `aiohttp` extra): the
                # generator's CPU per streamed job fell from 6.2 to 3.6 ms (make bench).
                # Its pool copes with servers that close idle connections (connections).
                http_client=connections.http_client(self.timeout_seconds),
            )
        return self._client

    async def complete(
        self, messages: list[ChatCompletionMessageParam], *, on_text: TextSink | None = None
    ) -> Completion:
        """Ask for a JSON reply; raises :class:`~canvas_generator.errors.AttemptFailed`.

        When the client streams, ``on_text`` gets each piece of the reply as it arrives.
        """
        with tracing.span(
            f"chat {self.model}", kind=SpanKind.CLIENT, attributes=self._span_attributes()
        ) as span:
            try:
                completion = await self._complete(messages, on_text)
            except AttemptFailed as exc:
                span.set_attribute("canvas.failure_kind", exc.kind.value)
                raise
            _describe(span, completion)
            return completion

    def _span_attributes(self) -> dict[str, Any]:
        address = urlsplit(self.base_url or "https://api.openai.com/v1")
        return {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": self.model,
            "server.address": address.hostname,
            "server.port": address.port,
            "canvas.streamed": self.stream,
        }

    async def _complete(
        self, messages: list[ChatCompletionMessageParam], on_text: TextSink | None
    ) -> Completion:
        client = self._openai()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                if self.stream:
                    return await self._streamed(client, messages, on_text, started)
                return await self._whole(client, messages, started)
        except TimeoutError as exc:
            raise classify(exc, timeout_seconds=self.timeout_seconds) from exc
        finally:
            self.metrics.openai_request_seconds.observe(time.perf_counter() - started)

    async def _whole(
        self, client: openai.AsyncOpenAI, messages: list[ChatCompletionMessageParam], started: float
    ) -> Completion:
        try:
            response = await client.chat.completions.create(
                model=self.model,
                messages=messages,
                response_format={"type": "json_object"},
            )
        except Exception as exc:
            raise self._classify(exc) from exc
        if not response.choices:
            raise BadOutput("model output had no choices")
        choice = response.choices[0]
        return Completion(
            text=choice.message.content or "",
            model=response.model or self.model,
            usage=_usage(response.usage),
            latency_ms=_since(started),
            finish_reason=choice.finish_reason,
        )

    async def _streamed(
        self,
        client: openai.AsyncOpenAI,
        messages: list[ChatCompletionMessageParam],
        on_text: TextSink | None,
        started: float,
    ) -> Completion:
        reply = _Reply()
        # Leaving the block closes the HTTP response, also when this task is cancelled
        # (a job cancel): the server sees the client go and stops generating.
        async with contextlib.AsyncExitStack() as stack:
            http = await self._open_stream(client, messages)
            stack.push_async_callback(http.aclose)
            chunks = await stack.enter_async_context(contextlib.aclosing(_body(http)))
            await self._read_stream(chunks, http.request, reply, on_text)
            if reply.done and http.http_version == "HTTP/1.1":
                await _drain(chunks)
        if reply.finish_reason is None:
            # The server closed the stream (cleanly or not) before the model said it
            # was done: whatever objects arrived, the drawing is not complete.
            raise BadOutput(
                f"the model's reply was cut off midway: its stream ended after {reply.received} "
                "characters without a finish_reason"
            )
        return Completion(
            text="".join(reply.pieces),
            model=reply.model or self.model,
            usage=reply.usage,
            latency_ms=_since(started),
            finish_reason=reply.finish_reason,
        )

    async def _open_stream(
        self, client: openai.AsyncOpenAI, messages: list[ChatCompletionMessageParam]
    ) -> httpx2.Response:
        """Send the streamed call; its response, whose body is still to read."""
        body: CompletionCreateParamsStreaming = {
            "model": self.model,
            "messages": messages,
            "response_format": {"type": "json_object"},
            "stream": True,
            # The usage comes in a last chunk with no choices.
            "stream_options": {"include_usage": True},
        }
        try:
            # chat.completions.create(stream=True) sends this very body (test_client
            # checks), after a pass over it against its parameter types that changes
            # nothing in it and cost 0.45 ms a call, a tenth of a streamed call's CPU.
            return await client.post(
                "/chat/completions",
                cast_to=httpx2.Response,
                body=body,
                stream=True,
                # No timeout of each read: the whole call is bounded by the same number
                # of seconds (_complete), which runs out first; a read timeout's timer
                # moved at every chunk was a twentieth of the generator's CPU.
                options={"timeout": httpx2.Timeout(self.timeout_seconds, read=None)},
            )
        except Exception as exc:
            raise self._classify(exc) from exc

    async def _read_stream(
        self,
        chunks: AsyncIterator[bytes],
        request: httpx2.Request,
        reply: _Reply,
        on_text: TextSink | None,
    ) -> None:
        """Read the body into ``reply`` until [DONE] or its end, handing each piece of text
        to ``on_text``; what breaks the read is raised as the connection breaking off."""
        events = EventStream()
        while not reply.done:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except Exception as exc:
                error = _as_openai_error(exc, request)
                raise self._broke_off(error, reply) from error
            pieces, failure = reply.read(events.feed(chunk), request)
            # Outside any try: what on_text raises reaches the caller unchanged. The text
            # before an event that breaks the reply is handed on first, also when one
            # read brought both (the objects it completes were written before the break).
            if on_text is not None:
                for piece in pieces:
                    on_text(piece)
            if failure is not None:
                error = _as_openai_error(failure, request)
                raise self._broke_off(error, reply) from error

    def _broke_off(self, error: Exception, reply: _Reply) -> AttemptFailed:
        return broke_off(
            error,
            received_chars=reply.received,
            timeout_seconds=self.timeout_seconds,
            secrets=(self.api_key,),
        )

    def _classify(self, exc: Exception) -> Exception:
        return classify(exc, timeout_seconds=self.timeout_seconds, secrets=(self.api_key,))

    async def aclose(self) -> None:
        """Close the HTTP connections, if any were opened."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class _Reply:
    """What a streamed reply has said so far, from the data of its events."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.received = 0  # characters of text in pieces
        self.model: str | None = None
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None
        self.done = False  # [DONE] came: nothing after it is read

    def read(
        self, payloads: list[bytes], request: httpx2.Request
    ) -> tuple[list[str], Exception | None]:
        """Take the data of the next events (``chat.completion.chunk`` objects); return
        the new pieces of text, and what broke the reply after them if anything did (an
        :class:`openai.APIError` for an error event, as the openai client raises it; a
        ValueError for data that is not JSON). Nothing after that is read."""
        new: list[str] = []
        failure: Exception | None = None
        for payload in payloads:
            if payload.startswith(b"[DONE]"):
                self.done = True
                break
            try:
                self._chunk(orjson.loads(payload), request, new)
            except Exception as exc:  # as any error of the read: the reply broke off
                failure = exc
                break
        self.pieces.extend(new)
        return new, failure

    def _chunk(self, chunk: Any, request: httpx2.Request, new: list[str]) -> None:
        """Read one chunk's fields; its piece of text, if any, goes to ``new``."""
        error = chunk.get("error")
        if error:
            raise _error_event(error, request)
        model = chunk.get("model")
        if model and isinstance(model, str):
            self.model = model
        usage = chunk.get("usage")
        if usage is not None:
            self.usage = _token_counts(usage)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # n=1 is asked: another choice is not ours to read
            finish_reason = choice.get("finish_reason")
            if finish_reason is not None:
                self.finish_reason = str(finish_reason)
            delta = choice.get("delta")
            piece = delta.get("content") if delta else None
            if piece and isinstance(piece, str):
                new.append(piece)
                self.received += len(piece)


def _error_event(error: Any, request: httpx2.Request) -> openai.APIError:
    """The error an event ``{"error": {...}}`` stands for: the provider gave up midway."""
    message = error.get("message") if isinstance(error, Mapping) else None
    if not message or not isinstance(message, str):
        message = "the stream carried an error without a message"
    return openai.APIError(message, request, body=error)


def _as_openai_error(exc: Exception, request: httpx2.Request) -> Exception:
    """``exc``, raised while reading the body, as the openai client would have raised it;
    but a connection the server closed, which the aiohttp transport maps to a
    ConnectTimeout, as the connection error it is, named by aiohttp's own error."""
    named: BaseException | None = exc  # errors.broke_off names it: "(RemoteProtocolError)"
    if isinstance(exc, httpx2.TimeoutException) and lost_connection(exc.__cause__):
        error: openai.APIConnectionError = openai.APIConnectionError(request=request)
        named = exc.__cause__
    elif isinstance(exc, httpx2.TimeoutException):
        error = openai.APITimeoutError(request=request)
    elif isinstance(exc, _CONNECTION_ERRORS):
        error = openai.APIConnectionError(request=request)
    else:
        return exc
    error.__cause__ = named
    return error


async def _body(http: httpx2.Response) -> AsyncGenerator[bytes]:
    """The bytes of a streamed response's body as they arrive.

    On the ``openai`` client's aiohttp transport they are read from aiohttp's own
    stream, as each read returns them: its bytes pass through three asynchronous
    iterators of httpx2 and the transport otherwise, a third of what a chunk cost the
    generator with 1,000 streams (``make bench SCENARIO=10s``). aiohttp's errors are
    mapped to httpx2's, as the transport maps them. Any other transport: its
    ``aiter_bytes``.
    """
    # httpx2's client wraps the transport's stream in one that times the response.
    stream = getattr(http.stream, "_stream", None)
    if not isinstance(stream, AiohttpResponseStream):
        async for chunk in http.aiter_bytes():
            yield chunk
        return
    content = stream._aiohttp_response.content
    while True:
        with map_aiohttp_exceptions():
            chunk = await content.readany()
        if not chunk:
            return
        yield chunk


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows [DONE], normally only the end of the body, so that the HTTP/1.1
    connection can serve the next call; one that takes longer is closed instead. The
    reply is complete: what breaks now is not its failure."""
    with contextlib.suppress(TimeoutError, *_CONNECTION_ERRORS):
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in chunks:
                pass


def _token_counts(usage: Mapping[str, Any]) -> dict[str, int]:
    return {name: usage[name] for name in _TOKEN_COUNTS if isinstance(usage.get(name), int)}


def _usage(usage: Any) -> dict[str, int]:
    if usage is None:
        return {}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _describe(span: Span, completion: Completion) -> None:
    """What the model answered, on the call's span."""
    span.set_attribute("gen_ai.response.model", completion.model)
    if completion.finish_reason is not None:
        span.set_attribute("gen_ai.response.finish_reasons", [completion.finish_reason])
    for name, key in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        if key in completion.usage:
            span.set_attribute(f"gen_ai.usage.{name}_tokens", completion.usage[key])


def _since(started: float) -> int:
    """Milliseconds since ``started`` (a perf_counter reading)."""
    return round((time.perf_counter() - started) * 1000)
