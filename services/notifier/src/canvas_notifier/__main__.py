"""``canvas-notifier``: run one notifier process."""

from __future__ import annotations

import functools
import gc
import logging

import structlog

from canvas_events.runtime import run
from canvas_events.settings import load_settings, start_logging
from canvas_notifier.service import serve
from canvas_notifier.settings import Settings

# Allocations (net of frees) between two collections of the youngest generation;
# CPython's default is 700.
GC_YOUNG_THRESHOLD = 10_000


def main() -> None:
    """Read the settings (exit 2 on a bad value), set up logging, run until SIGTERM."""
    settings = load_settings(Settings, "canvas-notifier")
    start_logging("notifier", settings)
    # websockets logs every probe answered over plain HTTP ("connection rejected") at INFO.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLogger().level))
    structlog.get_logger("canvas_notifier").info(
        "notifier starting",
        port=settings.notifier_port,
        topology_prefix=settings.amqp_topology_prefix,
        send_queue_size=settings.ws_send_queue_size,
        replay_limit=settings.replay_limit,
    )
    # Each connection holds a few hundred objects the cyclic GC tracks; a full
    # collection walks all of them (5,000 connections: several hundred ms during which
    # nothing is sent). Collect young objects ten times less often, so that a burst of
    # connects triggers a handful of full collections instead of dozens, and keep what
    # start-up built (modules, schemas) out of every collection.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    gc.freeze()
    run(functools.partial(serve, settings))


if __name__ == "__main__":
    main()
