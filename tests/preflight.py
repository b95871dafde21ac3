"""Run by `make test` before pytest: the suite needs a real PostgreSQL and RabbitMQ and
must fail loudly, never skip, when they are not there."""

from __future__ import annotations

import asyncio
import sys

import aio_pika
import asyncpg

from tests.support.env import amqp_url, database_url, redacted


async def main() -> int:
    problems = []
    try:
        conn = await asyncpg.connect(database_url("postgres"), timeout=5)
        await conn.close()
    except Exception as exc:
        problems.append(f"PostgreSQL at {redacted(database_url('postgres'))}: {exc!r}")
    try:
        connection = await aio_pika.connect(amqp_url(), timeout=5)
        await connection.close()
    except Exception as exc:
        problems.append(f"RabbitMQ at {redacted(amqp_url())}: {exc!r}")
    for problem in problems:
        print(f"preflight: cannot reach {problem}", file=sys.stderr)
    if problems:
        print(
            "preflight: the tests need both; set DATABASE_URL / AMQP_URL or start the local "
            "services (.ci/run does)",
            file=sys.stderr,
        )
        return 1
    print("preflight: PostgreSQL and RabbitMQ answer")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
