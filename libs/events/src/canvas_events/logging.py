"""JSON logs for every service (docs/operations.md, "Logs"): one JSON object a line on stdout with
``timestamp`` (ISO 8601 UTC), ``level``, ``service``, ``event``, and ``job_id`` and
``correlation_id`` wherever a job is in hand (bound with structlog's contextvars), and
``trace_id`` and ``span_id`` inside a span when traces are on (:mod:`canvas_events.tracing`).

Standard-library loggers (uvicorn, aio-pika, asyncpg) go through the same renderer, so
no line on stdout is anything but JSON. Secrets never reach a line: values registered
with :func:`register_secret` and passwords in URLs are masked in every string field.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

_SECRETS: set[str] = set()
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-_.=]+")
_TOKEN_PARAM = re.compile(r"(?i)([?&]token=)[^&\s\"']+")
_MASK = "***"


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear in a log line (short values are ignored)."""
    if value and len(value) >= 6:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """``text`` with registered secrets, URL passwords, bearer tokens and ``token=`` masked."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, _MASK)
    # Every log line passes here: run a pattern only when its anchor is in the text.
    if "@" in text:
        text = _URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{_MASK}@", text)
    lowered = text.lower()
    if "bearer" in lowered:
        text = _BEARER.sub(rf"\g<1>{_MASK}", text)
    if "token=" in lowered:
        text = _TOKEN_PARAM.sub(rf"\g<1>{_MASK}", text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    return value


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _redact_value(value)
    return event


def _drop_noise(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in ("job_id", "correlation_id"):
        if key in event and event[key] is None:
            del event[key]
    # uvicorn passes a copy of its message with terminal colour codes in it.
    event.pop("color_message", None)
    return event


def _json(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(
    service: str, level: str = "INFO", fmt: str = "json", *, stream: TextIO | None = None
) -> None:
    """Configure structlog and the standard library to write one line an event to
    ``stream`` (stdout; a command whose stdout is its answer logs to stderr)."""
    from canvas_events.tracing import add_trace_ids  # it masks with redact() from here

    stream = stream if stream is not None else sys.stdout

    def add_service(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("service", service)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        add_service,
        _drop_noise,
        add_trace_ids,
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # The project's own lines go straight to stdout, one write a line: a line the level
    # drops costs a no-op call, and none pays for a standard-library LogRecord.
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        cache_logger_on_first_use=True,
    )
    # Libraries' lines (uvicorn, asyncpg, aio-pika) come through the standard library and
    # the same processors.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries: their INFO lines say nothing an operator needs.
    for name in ("aio_pika", "aiormq", "uvicorn.access", "httpx", "httpx2", "openai", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
