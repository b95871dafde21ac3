"""``canvas-orchestrator``: serve (the default), ``rebuild-projections``, ``prune``, or
``dlq``."""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from canvas_events.logging import redact
from canvas_events.runtime import run
from canvas_events.settings import load_settings, start_logging
from canvas_orchestrator import dlq
from canvas_orchestrator.projections import rebuild
from canvas_orchestrator.retention import prune
from canvas_orchestrator.service import SERVICE_NAME, serve
from canvas_orchestrator.settings import CommandSettings, Settings
from canvas_store.connections import create_pool
from canvas_store.migrations import migrate_pool

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
        help="rebuild the read models (jobs, canvases, canvas_objects) from the event store, "
        "beside the live ones, and swap them in",
    )
    commands.add_parser(
        "prune",
        help="delete consumed message ids and ledger rows past their retention, now",
    )
    dlq.add_parser(commands)
    args = parser.parse_args(argv)

    command = args.command or "serve"
    settings = load_settings(Settings if command == "serve" else CommandSettings, PROGRAM)
    start_logging(SERVICE_NAME, settings, serving=command == "serve")

    if args.command == "rebuild-projections":
        raise SystemExit(asyncio.run(with_pool(settings, rebuild_projections)))
    if args.command == "prune":
        raise SystemExit(asyncio.run(with_pool(settings, prune_now)))
    if args.command == "dlq":
        raise SystemExit(asyncio.run(dlq.run(args, settings)))
    run(functools.partial(serve, settings))


async def with_pool(
    settings: Settings, command: Callable[[Settings, asyncpg.Pool], Awaitable[None]]
) -> int:
    """Run a one-off ``command`` on a migrated pool: 0 when done, 1 when the database is
    unreachable."""
    try:
        pool = await create_pool(settings.database_url.get_secret_value(), max_size=2)
    except Exception as exc:
        message = redact(f"{type(exc).__name__}: {exc}")
        log.error("cannot reach the database", error=message)
        print(f"{PROGRAM}: cannot reach the database: {message}", file=sys.stderr)
        return 1
    try:
        await migrate_pool(pool)
        await command(settings, pool)
    finally:
        await pool.close()
    return 0


async def rebuild_projections(_: Settings, pool: asyncpg.Pool) -> None:
    """The rebuild-projections command."""
    events = await rebuild(pool)
    print(f"{PROGRAM}: read models rebuilt from {events} events")


async def prune_now(settings: Settings, pool: asyncpg.Pool) -> None:
    """The prune command."""
    pruned = await prune(pool, settings.retention)
    print(
        f"{PROGRAM}: pruned {pruned.processed_messages} processed message ids, "
        f"{pruned.ledger} ledger rows, {pruned.cancel_requests} cancel requests"
    )


if __name__ == "__main__":
    main()
