"""``canvas-notifier``: run one notifier process."""

from __future__ import annotations

import functools
import logging
from urllib.parse import urlsplit

import structlog

from canvas_events.logging import configure_logging, register_secret
from canvas_events.runtime import run
from canvas_events.settings import load_settings
from canvas_notifier.server import serve
from canvas_notifier.settings import Settings


def main() -> None:
    """Read the settings (exit 2 on a bad value), set up logging, run until SIGTERM."""
    settings = load_settings(Settings, "canvas-notifier")
    configure_logging("notifier", settings.log_level, settings.log_format)
    # websockets logs every probe answered over plain HTTP ("connection rejected") at INFO.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLogger().level))
    register_secret(settings.jwt_secret.get_secret_value())
    for url in (settings.amqp_url.get_secret_value(), settings.database_url.get_secret_value()):
        register_secret(urlsplit(url).password)
    log = structlog.get_logger("canvas_notifier")
    if settings.jwt_secret_is_default:
        log.warning(
            "JWT_SECRET is not set: using the development secret; anyone can mint tokens",
            setting="JWT_SECRET",
        )
    log.info(
        "notifier starting",
        port=settings.notifier_port,
        topology_prefix=settings.amqp_topology_prefix,
        send_queue_size=settings.ws_send_queue_size,
        replay_limit=settings.replay_limit,
    )
    run(functools.partial(serve, settings))


if __name__ == "__main__":
    main()
