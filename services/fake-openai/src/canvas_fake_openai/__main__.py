"""``canvas-fake-openai``: run the offline stand-in model (see :mod:`canvas_fake_openai.server`).

Every knob is a FAKE_OPENAI_* variable and a flag of the same name; a flag wins."""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from canvas_events.logging import configure_logging, register_secret
from canvas_events.runtime import run, serve_http
from canvas_fake_openai.server import (
    DEFAULT_FAILURE_MODES,
    STAND_IN_MODEL,
    FakeConfig,
    FakeModel,
    FakeSettings,
    create_app,
    log,
)

PROGRAM = "canvas-fake-openai"
_DESCRIPTION = f"""\
The offline, OpenAI-compatible stand-in model of canvas-jobs: POST /v1/chat/completions
(streamed or not) draws a made-up flowchart from the prompt, deterministically. Point
the ai-generator at it with OPENAI_BASE_URL=http://HOST:PORT/v1 (make dev does, without
OPENAI_API_KEY). It accepts any model name and answers as "{STAND_IN_MODEL}".

Every option is also read from its environment variable (shown with each); an option
given here wins. The knobs can change while it runs: PUT /_fake/config with JSON, e.g.
{{"delay_ms": 20000}}; GET /_fake/config shows them, GET /_fake/stats counts the calls."""

_EPILOG = """\
A slow job, to try cancel or watch a reconnect: start it with --delay-ms 20000 (or
FAKE_OPENAI_DELAY_MS=20000 make dev), or change it at runtime with
  curl -X PUT http://127.0.0.1:8090/_fake/config -H 'Content-Type: application/json' \\
       -d '{"delay_ms": 20000}'
or put a directive in one prompt: "a login flow [[fake:delay_ms=20000]]".
Failures: --failure-rate 0.3 --failure-modes 500,429,timeout, or in one prompt
[[fake:status=429]], [[fake:garbage]], [[fake:timeout]], [[fake:first=2,status=500]]
(the first two calls fail, the retry works). Every directive is listed in
services/fake-openai/src/canvas_fake_openai/server.py's docstring."""

# (flag, setting, type, help); the variable is FAKE_OPENAI_<SETTING>, or LOG_* for logs.
_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--host", "host", str, "address to listen on (default 127.0.0.1)"),
    ("--port", "port", int, "port to listen on (default 8090)"),
    ("--delay-ms", "delay_ms", int, "wait before answering each call, ms (default 0)"),
    (
        "--chunk-delay-ms",
        "chunk_delay_ms",
        int,
        "wait between streamed chunks, ms (default 0; make dev uses 40)",
    ),
    (
        "--failure-rate",
        "failure_rate",
        float,
        "share of calls, 0..1, that fail on purpose (default 0)",
    ),
    (
        "--failure-modes",
        "failure_modes",
        str,
        "how they fail, drawn at random from a comma list of HTTP statuses (500, 503, 429 "
        "with Retry-After, ...) and timeout (no answer), garbage (not JSON), empty (no "
        f"valid object), cut (truncated) (default {DEFAULT_FAILURE_MODES})",
    ),
    ("--seed", "seed", int, "seed of the failure draws, for a reproducible run"),
    (
        "--require-key",
        "require_key",
        str,
        "answer 401 (OpenAI's error shape) to a call whose bearer key differs",
    ),
    ("--log-level", "log_level", str.upper, "DEBUG, INFO (default), WARNING or ERROR"),
    ("--log-format", "log_format", str, "json (default) or console"),
)


def _variable(setting: str) -> str:
    return setting.upper() if setting.startswith("log_") else f"FAKE_OPENAI_{setting.upper()}"


def parser() -> argparse.ArgumentParser:
    """The command line: ``--help`` documents every knob; nothing starts for it."""
    command = argparse.ArgumentParser(
        prog=PROGRAM,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, setting, kind, text in _OPTIONS:
        command.add_argument(
            flag,
            dest=setting,
            type=kind,
            metavar=_variable(setting).removeprefix("FAKE_OPENAI_"),
            help=f"{text} [{_variable(setting)}]",
        )
    return command


async def _serve(settings: FakeSettings, stop: asyncio.Event) -> None:
    model = FakeModel(FakeConfig.from_settings(settings), seed=settings.seed)
    log.warning(
        "offline OpenAI stand-in listening: its drawings are canned, not a real model",
        base_url=f"http://{settings.host}:{settings.port}/v1",
        **model.config.public(),
    )
    await serve_http(create_app(model), settings.port, stop, host=settings.host)


def load_settings(argv: Sequence[str] | None = None) -> FakeSettings:
    """FakeSettings from the flags over the environment, or exit 2 naming each bad one
    (with its FAKE_OPENAI_ prefix, which canvas_events' load_settings does not know)."""
    given = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    try:
        return FakeSettings(**given)
    except ValidationError as exc:
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "<settings>"
            if name in FakeSettings.model_fields:
                flag = "--" + name.replace("_", "-")
                name = f"{flag} / {_variable(name)}"
            print(f"{PROGRAM}: invalid setting {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    """``canvas-fake-openai``: serve the stand-in until SIGTERM."""
    settings = load_settings()
    configure_logging("fake-openai", settings.log_level, settings.log_format)
    if settings.require_key is not None:
        register_secret(settings.require_key.get_secret_value())
    run(functools.partial(_serve, settings))


if __name__ == "__main__":
    main()
