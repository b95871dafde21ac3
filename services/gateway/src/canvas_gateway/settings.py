"""The gateway's configuration, read from the environment (docs/settings.md)."""

from __future__ import annotations

from pydantic import Field, field_validator

from canvas_events.settings import Port, ServiceSettings


class Settings(ServiceSettings):
    """Everything the gateway reads; built once at the edge and passed down."""

    gateway_port: Port = 8000
    # A larger request body answers 413 before it is read (docs/settings.md).
    max_request_bytes: int = Field(default=65_536, ge=1_024, le=16 * 1024 * 1024)
    # Unfinished jobs (queued, processing, retry_scheduled) one user may have at once.
    max_active_jobs_per_user: int = Field(default=20, ge=1, le=100_000)
    # Model tokens one user's jobs may use in a UTC day (canvas_store.usage); unset or
    # empty: no limit. Admins are exempt.
    user_daily_token_budget: int | None = Field(default=None, gt=0, le=10**15)
    # How long a request waits for the broker's confirm before answering 503.
    publish_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # An accepted job the orchestrator has not recorded this long after it was sent is
    # sent again (twice as long after each further try), up to LEDGER_MAX_RESENDS
    # times; then it is given up, failed with a reason (canvas_gateway.ledger).
    ledger_resend_after_seconds: float = Field(default=60.0, gt=0, le=86_400)
    ledger_max_resends: int = Field(default=5, ge=0, le=100)
    # GET /api/ai-agent/health says `degraded` beyond these (docs/operations.md):
    # seconds the oldest queued job may wait for a generator,
    health_queued_age_seconds: float = Field(default=60.0, gt=0, le=86_400)
    # events recorded but not yet published by the orchestrator's relay,
    health_outbox_lag_events: int = Field(default=1000, ge=1, le=100_000_000)
    # and seconds the oldest of them may wait (the relay publishes within a second).
    health_outbox_age_seconds: float = Field(default=30.0, gt=0, le=86_400)
    # Where browsers reach the notifier's WebSocket (the page at / reads it from
    # /config.json). Unset: ws://<the host the browser asked for>:NOTIFIER_PORT/ws, right
    # whenever the notifier listens beside the gateway; set it behind a proxy or ingress.
    notifier_public_url: str | None = Field(default=None, max_length=2000)
    # Read only to derive that default: the notifier's own variable (docs/settings.md).
    notifier_port: Port = 8001

    @field_validator("user_daily_token_budget", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        return None if value == "" else value  # USER_DAILY_TOKEN_BUDGET= means unset

    @field_validator("notifier_public_url", mode="before")
    @classmethod
    def _websocket_url(cls, value: object) -> object:
        if value == "":
            return None  # NOTIFIER_PUBLIC_URL= (empty) means unset, as in a compose file
        if isinstance(value, str) and not value.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return value
