"""Configuration read from the environment only (docs/settings.md).

Each service has one ``Settings`` class built on :class:`CommonSettings`, made once at
the edge by :func:`load_settings` and passed down, so a test can build its own. A bad
value stops the service with a message naming the variable and exit code 2; an
unreachable database or broker does not (the service waits for them, /ready says why).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Annotated, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import structlog
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from canvas_events.logging import configure_logging, register_secret
from canvas_events.topology import QUORUM, QueueType, Topology
from canvas_events.tracing import configure_tracing

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/canvas_jobs"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Long enough for HS256 (RFC 7518 asks for 256 bits); only ever a development default.
DEV_JWT_SECRET = "canvas-jobs-development-secret-change-me-0123456789"  # noqa: S105

Port = Annotated[int, Field(ge=1, le=65535)]


class CommonSettings(BaseSettings):
    """Settings every service reads."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=False)

    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    amqp_url: SecretStr = SecretStr(DEFAULT_AMQP_URL)
    # Every exchange and queue name starts with it: tests and side-by-side installs.
    amqp_topology_prefix: str = Field(default="canvas", pattern=r"^[a-z][a-z0-9_\-]{0,40}$")
    # The type of the queues every process shares: quorum (replicated across a cluster's
    # nodes) or classic. A queue that exists with the other type is kept as it is.
    amqp_queue_type: QueueType = QUORUM
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    # Seconds to let in-flight work finish on SIGTERM.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=600)

    @property
    def topology(self) -> Topology:
        """The exchange and queue names of this installation."""
        return Topology(self.amqp_topology_prefix, self.amqp_queue_type)


# HS256 keys shorter than the hash give less than its strength (RFC 7518, 3.2).
MIN_JWT_SECRET_LENGTH = 32


class AuthSettings(BaseSettings):
    """JWT settings, for the services that read or mint tokens.

    JWT_SECRET is required: without it a service refuses to start, naming it, unless
    CANVAS_ENV=development (``make dev``, the tests), where the public development secret
    is used with a loud warning. A deployment that forgot the variable fails closed.
    """

    # Declared before jwt_secret: its validator reads it.
    canvas_env: str = Field(default="production", max_length=40)
    jwt_secret: SecretStr | None = Field(default=None, validate_default=True)

    @field_validator("jwt_secret")
    @classmethod
    def _required_outside_development(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr:
        development = info.data.get("canvas_env") == "development"
        if value is None or not value.get_secret_value():
            if development:
                return SecretStr(DEV_JWT_SECRET)
            raise ValueError("is required (CANVAS_ENV=development uses a development secret)")
        if len(value.get_secret_value()) < MIN_JWT_SECRET_LENGTH and not development:
            raise ValueError(f"must be at least {MIN_JWT_SECRET_LENGTH} characters")
        return value

    @property
    def secret(self) -> str:
        """JWT_SECRET in clear, for signing and checking tokens only."""
        assert self.jwt_secret is not None  # set by the validator
        return self.jwt_secret.get_secret_value()

    @property
    def jwt_secret_is_default(self) -> bool:
        """True when JWT_SECRET was not set (development only, with a loud warning)."""
        return self.secret == DEV_JWT_SECRET


class ServiceSettings(CommonSettings, AuthSettings):
    """What every service reads: the common settings and JWT_SECRET (the gateway and
    the notifier check users' tokens; the orchestrator checks, and the generator shows,
    the service credential). Each service's Settings adds its own."""

    # Stated again: with two BaseSettings bases pydantic would take AuthSettings' defaults.
    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=False)


T = TypeVar("T")


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


# A setting that may be unset, also by an empty value (as compose and a ConfigMap pass it).
Unset = Annotated[T | None, BeforeValidator(_empty_is_none)]


class ModelBudgetSettings(BaseModel):
    """The fleet's model budget, read by the orchestrator (which grants the permits) and
    the generators (which ask for one before each call while a limit is set): set both
    from the same configuration. Unset: no limit."""

    model_requests_per_minute: Unset[int] = Field(default=None, gt=0, le=10_000_000)
    model_tokens_per_minute: Unset[int] = Field(default=None, gt=0, le=10_000_000_000)
    # The window both limits count in: a minute. Shorter only for tests and benches.
    model_budget_window_seconds: float = Field(default=60.0, gt=0, le=3_600)

    @property
    def model_budget_limited(self) -> bool:
        """Whether a limit is set (then every model call needs a permit)."""
        return self.model_requests_per_minute is not None or (
            self.model_tokens_per_minute is not None
        )


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], program: str) -> S:
    """Build ``cls`` from the environment, or exit 2 naming each bad variable.

    The message never echoes a value: a bad value may be a secret.
    """
    try:
        return cls()
    except ValidationError as exc:
        for err in exc.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "<settings>"
            print(f"{program}: invalid setting {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def start_logging(
    service: str,
    settings: ServiceSettings,
    *,
    secrets: Iterable[str | None] = (),
    urls: Iterable[str] = (),
    serving: bool = True,
) -> None:
    """What every service does first: configure its JSON logs, mask every secret it
    holds in them (JWT_SECRET, ``secrets``, the passwords of DATABASE_URL, AMQP_URL and
    ``urls``, the values of the OTLP exporter's headers), and, when ``serving`` (not a
    one-off command), start its traces if OTEL_* asks for them and warn loudly when
    JWT_SECRET is the development one."""
    configure_logging(service, settings.log_level, settings.log_format)
    for secret in (settings.secret, *secrets, *_otlp_header_values()):
        register_secret(secret)
    for url in (settings.database_url.get_secret_value(), settings.amqp_url.get_secret_value()):
        register_secret(_password(url))
    for url in urls:
        register_secret(_password(url))
    if serving and configure_tracing(service) is not None:
        structlog.get_logger(service).info(
            "traces on", exporters=os.environ.get("OTEL_TRACES_EXPORTER") or "otlp"
        )
    if serving and settings.jwt_secret_is_default:
        structlog.get_logger(service).warning(
            "JWT_SECRET IS NOT SET: using the public development secret (CANVAS_ENV="
            "development); anyone can mint tokens. Set JWT_SECRET outside development.",
            setting="JWT_SECRET",
        )


def _otlp_header_values() -> list[str]:
    """The values of OTEL_EXPORTER_OTLP_(TRACES_)HEADERS (``key=value,...``): API keys of
    a tracing backend, as a rule."""
    values = []
    for name in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
        for pair in os.environ.get(name, "").split(","):
            value = pair.partition("=")[2].strip()
            values += [value, unquote(value)]
    return values


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:  # not a URL urlsplit can read: nothing to mask
        return None
