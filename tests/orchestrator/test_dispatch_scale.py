"""Fair dispatch's reads on the real Postgres, whatever the backlog: a round reads the
jobs it may hand out and the attempts in flight, not every job that waits, and its
order is the fair order's definition (docs/events.md, "Fair dispatch")."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from canvas_orchestrator.dispatch import _FAIR_ORDER, _FLEET


async def _insert(pool: asyncpg.Pool, rows: list[dict[str, Any]]) -> None:
    await pool.executemany(
        """
        INSERT INTO jobs (id, user_id, canvas_id, query, priority, status, created_at,
                          updated_at, version, last_position, awaiting_dispatch,
                          lease_expires_at)
        VALUES ($1, $2, $3, 'q', $4, $5, $6, $6, 2, 0, $7, $8)
        """,
        [
            (
                row["id"],
                row["user_id"],
                f"canvas-{row['id']}",
                row["priority"],
                row["status"],
                row["created_at"],
                row["waiting"],
                row["lease"],
            )
            for row in rows
        ],
    )


def _jobs(rng: random.Random, users: int, waiting: int, running: int) -> list[dict[str, Any]]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for n in range(waiting + running):
        is_waiting = n < waiting
        rows.append(
            {
                "id": uuid4(),
                "user_id": f"user-{rng.randrange(users)}",
                "priority": rng.choice([0, 5, 5, 5, 9]),
                "status": "queued" if is_waiting else rng.choice(["queued", "processing"]),
                "created_at": start + timedelta(milliseconds=rng.randrange(10_000)),
                "waiting": is_waiting,
                "lease": None if is_waiting else start + timedelta(hours=1),
            }
        )
    return rows


def _fair_order(rows: list[dict[str, Any]], room: int) -> list[UUID]:
    """The definition: the highest priority first; within a priority a user's k-th
    waiting job after every other user's (k-1)-th, counting what each user runs; then
    the oldest first, then the id."""
    running: dict[str, int] = {}
    for row in rows:
        if row["lease"] is not None:
            running[row["user_id"]] = running.get(row["user_id"], 0) + 1
    waiting = sorted(
        (row for row in rows if row["waiting"]),
        key=lambda row: (-row["priority"], row["created_at"], row["id"]),
    )
    rank: dict[str, int] = {}
    keyed = []
    for row in waiting:
        rank[row["user_id"]] = rank.get(row["user_id"], 0) + 1
        n = running.get(row["user_id"], 0) + rank[row["user_id"]]
        keyed.append(((-row["priority"], n, row["created_at"], row["id"]), row["id"]))
    return [job_id for _, job_id in sorted(keyed)[:room]]


async def test_a_round_hands_out_in_the_fair_order(pool: asyncpg.Pool) -> None:
    rng = random.Random(16)
    rows = _jobs(rng, users=7, waiting=300, running=40)
    await _insert(pool, rows)
    for room in (1, 3, 20, 120, 400):
        chosen = [row["id"] for row in await pool.fetch(_FAIR_ORDER, room)]
        assert chosen == _fair_order(rows, room), room


def _rows_read(plan: dict[str, Any], relation: str) -> int:
    """Rows the plan's scans of ``relation`` returned, over all their loops."""
    read = 0
    if plan.get("Relation Name") == relation:
        read += plan["Actual Rows"] * plan["Actual Loops"]
        read += plan.get("Rows Removed by Filter", 0) * plan["Actual Loops"]
    for child in plan.get("Plans", []):
        read += _rows_read(child, relation)
    return read


async def _read_by(pool: asyncpg.Pool, statement: str, *args: Any) -> int:
    async with pool.acquire() as conn:
        [[explained]] = await conn.fetch(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", *args)
    # The service's connections decode json themselves (canvas_store.connections).
    plans = json.loads(explained) if isinstance(explained, str) else explained
    return _rows_read(plans[0]["Plan"], "jobs")


async def test_a_round_reads_what_it_may_hand_out_not_the_backlog(pool: asyncpg.Pool) -> None:
    """A backlog of 20,000 waiting jobs of five users: a round with room for ten reads
    about ten jobs a user and the attempts in flight (before: every waiting job, twice:
    about 200 ms a round at 100,000, and 12 ms for the fleet's read in every new job's
    transaction)."""
    rows = _jobs(random.Random(20), users=5, waiting=20_000, running=50)
    await _insert(pool, rows)
    await pool.execute("ANALYZE jobs")
    assert await _read_by(pool, _FAIR_ORDER, 10) < 500
    since = datetime.now(UTC) - timedelta(seconds=15)
    assert await _read_by(pool, _FLEET, since) < 500
