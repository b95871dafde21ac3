"""``canvas-gateway``: serve the REST API, or ``canvas-gateway token --user NAME`` to
print a development token signed with JWT_SECRET."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from datetime import timedelta

from canvas_events.auth import mint_token
from canvas_events.runtime import run
from canvas_events.settings import load_settings, start_logging
from canvas_gateway.service import serve
from canvas_gateway.settings import Settings

PROGRAM = "canvas-gateway"


def _positive_hours(value: str) -> float:
    hours = float(value)
    if not 0 < hours <= 24 * 365:
        raise argparse.ArgumentTypeError("must be > 0 and at most 8760 (a year)")
    return hours


def _user(value: str) -> str:
    if not 0 < len(value) <= 128:
        raise argparse.ArgumentTypeError("must be 1..128 characters")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="The canvas-jobs REST gateway. Configured by the environment "
        "(DATABASE_URL, AMQP_URL, JWT_SECRET, GATEWAY_PORT, MAX_ACTIVE_JOBS_PER_USER, ...).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    token = commands.add_parser("token", help="print a development token signed with JWT_SECRET")
    token.add_argument("--user", required=True, type=_user, help="the token's sub (user id)")
    token.add_argument("--admin", action="store_true", help="add the admin role")
    token.add_argument(
        "--ttl-hours", type=_positive_hours, default=24 * 7, help="lifetime (default 168)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    settings = load_settings(Settings, PROGRAM)
    if args.command == "token":
        if settings.jwt_secret_is_default:
            print(
                f"{PROGRAM}: warning: JWT_SECRET is not set; signing with the development secret",
                file=sys.stderr,
            )
        secret = settings.secret
        print(mint_token(args.user, secret, admin=args.admin, ttl=timedelta(hours=args.ttl_hours)))
        return
    start_logging("gateway", settings)
    run(functools.partial(serve, settings))


if __name__ == "__main__":
    main()
