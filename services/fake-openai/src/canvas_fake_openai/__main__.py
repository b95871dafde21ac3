"""``canvas-fake-openai``: run the offline stand-in model (see :mod:`canvas_fake_openai.server`)."""

from __future__ import annotations

import asyncio
import functools
import sys

from pydantic import ValidationError

from canvas_events.logging import configure_logging, register_secret
from canvas_events.runtime import run, serve_http
from canvas_fake_openai.server import FakeConfig, FakeModel, FakeSettings, create_app, log


async def _serve(settings: FakeSettings, stop: asyncio.Event) -> None:
    model = FakeModel(FakeConfig.from_settings(settings), seed=settings.seed)
    log.warning(
        "offline OpenAI stand-in listening: its drawings are canned, not a real model",
        base_url=f"http://{settings.host}:{settings.port}/v1",
        **model.config.public(),
    )
    await serve_http(create_app(model), settings.port, stop, host=settings.host)


def _load_settings() -> FakeSettings:
    """FakeSettings from the environment, or exit 2 naming each bad variable (with its
    FAKE_OPENAI_ prefix, which canvas_events' load_settings does not know about)."""
    try:
        return FakeSettings()
    except ValidationError as exc:
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "<settings>"
            if name in FakeSettings.model_fields:
                name = f"FAKE_OPENAI_{name}"
            print(
                f"canvas-fake-openai: invalid setting {name.upper()}: {err['msg']}", file=sys.stderr
            )
        raise SystemExit(2) from None


def main() -> None:
    """``canvas-fake-openai``: serve the stand-in until SIGTERM."""
    settings = _load_settings()
    configure_logging("fake-openai", settings.log_level, settings.log_format)
    if settings.require_key is not None:
        register_secret(settings.require_key.get_secret_value())
    run(functools.partial(_serve, settings))


if __name__ == "__main__":
    main()
