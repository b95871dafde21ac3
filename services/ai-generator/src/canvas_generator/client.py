"""One chat completion call to an OpenAI-compatible model."""

from __future__ import annotations

import time
from dataclasses import dataclass

import openai
from openai.types.chat import ChatCompletionMessageParam

from canvas_generator.errors import BadOutput, MissingApiKey, classify
from canvas_generator.metrics import OPENAI_REQUEST_SECONDS
from canvas_generator.settings import Settings


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
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self.model = model
        self.timeout_seconds = timeout_seconds
        self._client: openai.AsyncOpenAI | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelClient:
        """A client configured by OPENAI_* settings."""
        return cls(
            api_key=settings.api_key,
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            timeout_seconds=settings.openai_timeout_seconds,
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

    async def complete(self, messages: list[ChatCompletionMessageParam]) -> Completion:
        """Ask for a JSON reply; raises :class:`~canvas_generator.errors.AttemptFailed`."""
        client = self._openai()
        started = time.perf_counter()
        try:
            response = await client.chat.completions.create(
                model=self.model,
                messages=messages,
                response_format={"type": "json_object"},
            )
        except Exception as exc:
            raise classify(
                exc, timeout_seconds=self.timeout_seconds, secrets=(self._api_key,)
            ) from exc
        finally:
            OPENAI_REQUEST_SECONDS.observe(time.perf_counter() - started)
        latency_ms = round((time.perf_counter() - started) * 1000)
        if not response.choices:
            raise BadOutput("model output had no choices")
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=choice.message.content or "",
            model=response.model or self.model,
            usage=(
                {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.total_tokens,
                }
                if usage is not None
                else {}
            ),
            latency_ms=latency_ms,
            finish_reason=choice.finish_reason,
        )

    async def aclose(self) -> None:
        """Close the HTTP connections, if any were opened."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()
