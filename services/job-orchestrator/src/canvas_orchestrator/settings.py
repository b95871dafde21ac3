"""The orchestrator's configuration, read from the environment (docs/settings.md)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from canvas_events.settings import ModelBudgetSettings, Port, ServiceSettings
from canvas_orchestrator.retention import Retention


class Settings(ServiceSettings, ModelBudgetSettings):
    """Everything the job-orchestrator reads from the environment. JWT_SECRET checks the
    service credential its internal API asks for."""

    orchestrator_port: Port = 8002
    max_job_retries: int = Field(default=3, ge=0, le=100)
    retry_backoff_base: float = Field(default=2.0, ge=1, le=100)
    retry_backoff_unit_seconds: float = Field(default=60.0, ge=0, le=86_400)
    # Read only to check the lease against it: the generator's model call must fit in it.
    openai_timeout_seconds: float | None = Field(default=None, gt=0)
    generation_lease_seconds: float = Field(default=180.0, gt=0, le=86_400)
    # How long a dispatched attempt may wait in the work queue before it is given up and
    # retried: long, so that a backlog never burns retries (a queued message is durable).
    generation_start_timeout_seconds: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    # Messages handled at once by this process (each one short transaction).
    orchestrator_prefetch: int = Field(default=64, ge=1, le=1_000)
    # How often the timers look for due retries and expired leases.
    timer_interval_seconds: float = Field(default=0.5, gt=0, le=60)
    # Fair dispatch (canvas_orchestrator.dispatch): how often the dispatcher looks, the
    # capacity assumed while no generator announces its own, and attempts dispatched
    # beyond the announced capacity (so that a freed slot finds work at once): at least
    # DISPATCH_HEADROOM, and DISPATCH_HEADROOM_FRACTION of the capacity when more.
    dispatch_interval_seconds: float = Field(default=0.1, gt=0, le=10)
    dispatch_unannounced_capacity: int = Field(default=100, ge=1, le=100_000)
    dispatch_headroom: int = Field(default=5, ge=0, le=10_000)
    dispatch_headroom_fraction: float = Field(default=0.2, ge=0, le=10)
    # Retention (canvas_orchestrator.retention): consumed message ids, and the gateway's
    # ledger rows of recorded jobs; pruned every PRUNE_INTERVAL_SECONDS.
    processed_messages_retention_seconds: float = Field(default=7 * 86_400, ge=3_600)
    ledger_retention_seconds: float = Field(default=86_400, ge=600)
    prune_interval_seconds: float = Field(default=3_600, gt=0, le=86_400)

    @property
    def retention(self) -> Retention:
        """How long pruned rows are kept."""
        return Retention(
            processed_messages=timedelta(seconds=self.processed_messages_retention_seconds),
            ledger=timedelta(seconds=self.ledger_retention_seconds),
        )

    @field_validator("generation_lease_seconds")
    @classmethod
    def _lease_outlasts_model_call(cls, value: float, info: ValidationInfo) -> float:
        timeout = info.data.get("openai_timeout_seconds")
        if timeout is not None and value <= timeout:
            # A lease shorter than the call would retry every slow but healthy attempt.
            raise ValueError(f"must exceed OPENAI_TIMEOUT_SECONDS ({timeout:g})")
        return value


class CommandSettings(Settings):
    """The settings of the one-off commands (``dlq``, ``prune``, ``rebuild-projections``):
    they check no token and sign none, so JWT_SECRET is not asked for."""

    @field_validator("jwt_secret")
    @classmethod
    def _required_outside_development(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr:
        return value or SecretStr("")
