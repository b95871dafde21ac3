"""Run by `make test` before pytest: say where the suite's PostgreSQL and RabbitMQ come
from (tests/support/backing.py: DATABASE_URL / AMQP_URL, else the local defaults, else
containers that pytest starts with testcontainers), or fail at once saying why there
are none: the suite never skips what it cannot run."""

from __future__ import annotations

import asyncio
import sys

from tests.support.backing import failure, plan, survey


def main() -> int:
    choices = plan(asyncio.run(survey()))
    message = failure(choices)
    if message is not None:
        print(f"preflight: {message}", file=sys.stderr)
        return 1
    for choice in choices:
        print(f"preflight: {choice.backing.name}: {choice.source}: {choice.why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
