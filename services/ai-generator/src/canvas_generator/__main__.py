"""``canvas-generator``: run one ai-generator process."""

from __future__ import annotations

import functools

import structlog

from canvas_events.logging import redact
from canvas_events.runtime import run
from canvas_events.settings import load_settings, start_logging
from canvas_generator.service import serve
from canvas_generator.settings import Settings


def main() -> None:
    """Read the settings (exit 2 on a bad value), set up logging, run until SIGTERM."""
    settings = load_settings(Settings, "canvas-generator")
    start_logging(
        "ai-generator",
        settings,
        secrets=[settings.api_key],
        urls=[settings.openai_base_url or "", settings.orchestrator_url],
    )
    log = structlog.get_logger("canvas_generator")
    if settings.api_key is None:
        log.warning(
            "OPENAI_API_KEY is not set: every attempt will fail until it is",
            setting="OPENAI_API_KEY",
        )
    log.info(
        "ai-generator starting",
        model=settings.openai_model,
        base_url=redact(settings.openai_base_url or "https://api.openai.com/v1"),
        max_concurrent_jobs=settings.max_concurrent_jobs,
        orchestrator_url=redact(settings.orchestrator_url),
        port=settings.generator_port,
        topology_prefix=settings.amqp_topology_prefix,
    )
    run(functools.partial(serve, settings))


if __name__ == "__main__":
    main()
