"""The gateway's configuration, read from the environment (ARCHITECTURE.md 2)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from canvas_events.settings import AuthSettings, CommonSettings, Port


class Settings(CommonSettings, AuthSettings):
    """Everything the gateway reads; built once at the edge and passed down."""

    # Stated again: with two BaseSettings bases pydantic would take AuthSettings' defaults.
    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=False)

    gateway_port: Port = 8000
    # Unfinished jobs (queued, processing, retry_scheduled) one user may have at once.
    max_active_jobs_per_user: int = Field(default=20, ge=1, le=100_000)
    # How long a request waits for the broker's confirm before answering 503.
    publish_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
