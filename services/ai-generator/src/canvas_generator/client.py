"""One chat completion call to an OpenAI-compatible model, streamed or not.

Streamed (OPENAI_STREAM, the default), the reply's text is handed to ``on_text`` piece
by piece as it arrives, and the call is complete only when the model said why it
stopped (a ``finish_reason``): a stream that ends without one was cut off, whatever
the text holds so far, and fails retryable. The whole call, streamed or not, is
bounded by OPENAI_TIMEOUT_SECONDS (the ``openai`` client's own timeout bounds each
read only, and a slow stream reads often).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

from canvas_generator.errors import BadOutput, MissingApiKey, broke_off, classify
from canvas_generator.metrics import OPENAI_REQUEST_SECONDS
from canvas_generator.settings import Settings

# Called with each piece of the reply's text as it arrives; what it raises ends the call
# and reaches the caller unchanged.
TextSink = Callable[[str], None]


@dataclass(frozen=True)
class Completion:
    """What the model answered, and what it cost."""

    text: str
    model: str
    usage: dict[str, int]
    latency_ms: int
    finish_reason: str | None


class ModelClient:
    """The ``openai`` client, made on first use: no network call and no key check happen
    at start, so the service starts (and says so in /ready) without either."""

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        model: str,
        timeout_seconds: float,
        stream: bool = True,
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self.model = model
        self.timeout_seconds = timeout_seconds
        self.stream = stream
        self._client: openai.AsyncOpenAI | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelClient:
        """A client configured by OPENAI_* settings."""
        return cls(
            api_key=settings.api_key,
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            timeout_seconds=settings.openai_timeout_seconds,
            stream=settings.openai_stream,
        )

    def _openai(self) -> openai.AsyncOpenAI:
        if self._api_key is None:
            raise MissingApiKey()
        if self._client is None:
            self._client = openai.AsyncOpenAI(
                api_key=self._api_key,
                base_url=self._base_url,
                timeout=self.timeout_seconds,
                # Every attempt is one call, visible in the job's history and retried by
                # the orchestrator's backoff (ARCHITECTURE.md 7).
                max_retries=0,
            )
        return self._client

    async def complete(
        self, messages: list[ChatCompletionMessageParam], *, on_text: TextSink | None = None
    ) -> Completion:
        """Ask for a JSON reply; raises :class:`~canvas_generator.errors.AttemptFailed`.

        When the client streams, ``on_text`` gets each piece of the reply as it arrives.
        """
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
            OPENAI_REQUEST_SECONDS.observe(time.perf_counter() - started)

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
        try:
            stream = await client.chat.completions.create(
                model=self.model,
                messages=messages,
                response_format={"type": "json_object"},
                stream=True,
                # The usage comes in a last chunk with no choices.
                stream_options={"include_usage": True},
            )
        except Exception as exc:
            raise self._classify(exc) from exc
        pieces: list[str] = []
        received = 0
        model: str | None = None
        usage: Any = None
        finish_reason: str | None = None
        # Leaving the block closes the HTTP response, also when this task is cancelled
        # (a job cancel): the server sees the client go and stops generating.
        async with stream:
            chunks = aiter(stream)
            while True:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    raise broke_off(
                        exc,
                        received_chars=received,
                        timeout_seconds=self.timeout_seconds,
                        secrets=(self._api_key,),
                    ) from exc
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue  # n=1 is asked: another choice is not ours to read
                    if choice.finish_reason is not None:
                        finish_reason = choice.finish_reason
                    piece = choice.delta.content if choice.delta is not None else None
                    if piece:
                        pieces.append(piece)
                        received += len(piece)
                        if on_text is not None:
                            on_text(piece)
        if finish_reason is None:
            # The server closed the stream (cleanly or not) before the model said it
            # was done: whatever objects arrived, the drawing is not complete.
            raise BadOutput(
                f"the model's reply was cut off midway: its stream ended after {received} "
                "characters without a finish_reason"
            )
        return Completion(
            text="".join(pieces),
            model=model or self.model,
            usage=_usage(usage),
            latency_ms=_since(started),
            finish_reason=finish_reason,
        )

    def _classify(self, exc: Exception) -> Exception:
        return classify(exc, timeout_seconds=self.timeout_seconds, secrets=(self._api_key,))

    async def aclose(self) -> None:
        """Close the HTTP connections, if any were opened."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _usage(usage: Any) -> dict[str, int]:
    if usage is None:
        return {}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _since(started: float) -> int:
    """Milliseconds since ``started`` (a perf_counter reading)."""
    return round((time.perf_counter() - started) * 1000)
