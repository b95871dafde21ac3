"""The ai-generator's configuration, from the environment (docs/settings.md)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from canvas_events.settings import ModelBudgetSettings, Port, ServiceSettings


class Settings(ServiceSettings, ModelBudgetSettings):
    """What the ai-generator reads from the environment. JWT_SECRET signs the service
    credential it shows the orchestrator's internal API."""

    openai_api_key: SecretStr | None = None
    # Any OpenAI-compatible server (the stand-in, a proxy); None means api.openai.com.
    openai_base_url: str | None = None
    openai_model: str = Field(default="gpt-4o-mini", min_length=1, max_length=200)
    # RabbitMQ closes a channel whose delivery stays unacked for 30 minutes
    # (consumer_timeout): one call must end well before that.
    openai_timeout_seconds: float = Field(default=60.0, gt=0, le=1200)
    # Stream the reply (each object published as soon as it is written). False for
    # OpenAI-compatible servers that cannot stream, or that send no finish_reason.
    openai_stream: bool = True
    # Per process: the work queue's prefetch, so also the number of calls in flight.
    max_concurrent_jobs: int = Field(default=10, ge=1, le=1000)
    generator_port: Port = 8003
    # The orchestrator's internal HTTP API: asked, before each model call, whether the
    # attempt is still the one its job waits for (a cancelled job's is not).
    orchestrator_url: str = "http://127.0.0.1:8002"
    # Short: when the orchestrator cannot answer in time, the attempt goes ahead anyway.
    orchestrator_timeout_seconds: float = Field(default=2.0, gt=0, le=30)

    @field_validator("orchestrator_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @field_validator("openai_api_key", "openai_base_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `OPENAI_API_KEY=` in a .env or compose file means "no key", not an empty key.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @property
    def api_key(self) -> str | None:
        """The API key in clear, for the client only."""
        return self.openai_api_key.get_secret_value() if self.openai_api_key else None
