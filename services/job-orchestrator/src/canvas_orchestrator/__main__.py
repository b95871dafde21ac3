"""``canvas-orchestrator``: serve (the default), ``rebuild-projections``, or ``dlq``."""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from urllib.parse import urlsplit

import structlog

from canvas_events.logging import configure_logging, redact, register_secret
from canvas_events.runtime import run
from canvas_events.settings import load_settings
from canvas_orchestrator import dlq
from canvas_orchestrator.app import SERVICE_NAME, serve
from canvas_orchestrator.db import create_pool
from canvas_orchestrator.migrations import migrate_pool
from canvas_orchestrator.projections import rebuild
from canvas_orchestrator.settings import Settings

PROGRAM = "canvas-orchestrator"
log = structlog.get_logger("canvas_orchestrator")


def main(argv: list[str] | None = None) -> None:
    """The console script."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="The canvas-jobs job-orchestrator; configured by the environment.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the orchestrator (the default)")
    commands.add_parser(
        "rebuild-projections",
        help="empty the read models (jobs, canvases, canvas_objects) and replay the event store",
    )
    dlq.add_parser(commands)
    args = parser.parse_args(argv)

    settings = load_settings(Settings, PROGRAM)
    configure_logging(SERVICE_NAME, settings.log_level, settings.log_format)
    for url in (settings.database_url, settings.amqp_url):
        register_secret(urlsplit(url.get_secret_value()).password)

    if args.command == "rebuild-projections":
        raise SystemExit(asyncio.run(rebuild_projections(settings)))
    if args.command == "dlq":
        raise SystemExit(asyncio.run(dlq.run(args, settings)))
    run(functools.partial(serve, settings))


async def rebuild_projections(settings: Settings) -> int:
    """The rebuild-projections command: 0 when done, 1 when the database is unreachable."""
    try:
        pool = await create_pool(settings.database_url.get_secret_value(), max_size=2)
    except Exception as exc:
        message = redact(f"{type(exc).__name__}: {exc}")
        log.error("cannot reach the database", error=message)
        print(f"{PROGRAM}: cannot reach the database: {message}", file=sys.stderr)
        return 1
    try:
        await migrate_pool(pool)
        events = await rebuild(pool)
    finally:
        await pool.close()
    print(f"{PROGRAM}: read models rebuilt from {events} events")
    return 0


if __name__ == "__main__":
    main()
