"""`make bench SCENARIO=history`: does a POST get slower as its user's history grows?

Starts the system as real processes, gives one user 100,000 past jobs (written straight
into the read model, with the ledger rows and consumed-message ids such a history leaves
behind, all a month old), then posts jobs one at a time, alternating between that user and
a fresh one, and compares how long each waits for its 202. Then runs
`canvas-orchestrator prune` and reports what it removed and the database's size before
and after (after a VACUUM FULL of the pruned tables: what a maintenance window returns to
the disk; a plain VACUUM lets PostgreSQL reuse the space).

Target: the long-standing user's p99 within 1.2x of the fresh user's.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tests.support.system import System, running_system

HEAVY, FRESH = "long-standing-user", "fresh-user"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def _seed(database_url: str, past_jobs: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            INSERT INTO jobs (id, user_id, canvas_id, query, priority, options, status,
                              created_at, updated_at, started_at, completed_at, retry_count,
                              attempt, version, last_position)
            SELECT gen_random_uuid(), $1, 'past-canvas-' || g, 'past job ' || g, 5, '{}',
                   'completed', now() - interval '30 days' - make_interval(secs => g),
                   now() - interval '30 days', now() - interval '30 days',
                   now() - interval '30 days', 0, 1, 7, g
            FROM generate_series(1, $2) AS g
            """,
            HEAVY,
            past_jobs,
        )
        # The ledger row each of them left at the gateway, recorded long ago.
        await conn.execute(
            """
            INSERT INTO gateway_job_requests (job_id, user_id, canvas_id, priority, query,
                                              correlation_id, created_at, confirmed_at,
                                              recorded_at)
            SELECT id, user_id, canvas_id, priority, query, 'past', created_at, created_at,
                   created_at
            FROM jobs WHERE user_id = $1
            """,
            HEAVY,
        )
        # Eight consumed messages a streamed job leaves (request, start, 5 objects, result).
        await conn.execute(
            """
            INSERT INTO processed_messages (consumer, message_id, processed_at)
            SELECT 'job-orchestrator', gen_random_uuid(), now() - interval '30 days'
            FROM generate_series(1, $1 * 8)
            """,
            past_jobs,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def _post_latencies(system: System, rounds: int) -> dict[str, list[float]]:
    """Milliseconds to each 202, one request at a time, the two users alternating."""
    latencies: dict[str, list[float]] = {HEAVY: [], FRESH: []}
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
        for index in range(rounds):
            for user in (HEAVY, FRESH):
                began = time.perf_counter()
                answer = await http.post(
                    "/api/ai-agent/create-canvas",
                    json={"query": f"history bench {index}"},
                    headers={"Authorization": f"Bearer {system.token(user)}"},
                )
                took = (time.perf_counter() - began) * 1000
                assert answer.status_code == 202, answer.text
                if index >= 10:  # the first ones warm connections and caches up
                    latencies[user].append(took)
    return latencies


async def _sizes(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT pg_database_size(current_database()) AS database, "
            "(SELECT count(*) FROM processed_messages) AS processed_messages, "
            "(SELECT count(*) FROM gateway_job_requests) AS ledger_rows"
        )
        assert row is not None
        return dict(row)
    finally:
        await conn.close()


async def run_history(log_dir: Path, past_jobs: int = 100_000, rounds: int = 310) -> dict[str, Any]:
    env = {
        "MAX_ACTIVE_JOBS_PER_USER": "100000",
        "FAKE_OPENAI_DELAY_MS": "0",
        "MAX_CONCURRENT_JOBS": "50",
    }
    async with running_system(log_dir, label="history", extra_env=env) as system:
        seeded = time.perf_counter()
        await _seed(system.database_url, past_jobs)
        seed_s = time.perf_counter() - seeded
        before = await _post_latencies(system, rounds)
        size_before = await _sizes(system.database_url)
        prune = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "canvas-orchestrator"),
            "prune",
            env={**os.environ, **system.env},
            stdout=asyncio.subprocess.PIPE,
        )
        pruned, _ = await asyncio.wait_for(prune.communicate(), 600)
        assert prune.returncode == 0
        conn = await asyncpg.connect(system.database_url)
        try:
            await conn.execute("VACUUM FULL processed_messages, gateway_job_requests")
        finally:
            await conn.close()
        size_after = await _sizes(system.database_url)
        after = await _post_latencies(system, rounds)

    def figures(latencies: dict[str, list[float]]) -> dict[str, float]:
        heavy, fresh = latencies[HEAVY], latencies[FRESH]
        return {
            "fresh_p50_ms": _pct(fresh, 0.5),
            "fresh_p99_ms": _pct(fresh, 0.99),
            "long_standing_p50_ms": _pct(heavy, 0.5),
            "long_standing_p99_ms": _pct(heavy, 0.99),
            "p99_ratio": round(_pct(heavy, 0.99) / _pct(fresh, 0.99), 2),
        }

    return {
        "past_jobs": past_jobs,
        "posts_per_user": rounds - 10,
        "seed_seconds": round(seed_s, 1),
        "before_prune": figures(before),
        "after_prune": figures(after),
        "prune_output": pruned.decode().strip().splitlines()[-1],
        "database_mb_before_prune": round(size_before["database"] / 2**20, 1),
        "database_mb_after_prune_and_vacuum_full": round(size_after["database"] / 2**20, 1),
        "rows_before_prune": {
            "processed_messages": size_before["processed_messages"],
            "ledger": size_before["ledger_rows"],
        },
        "rows_after_prune": {
            "processed_messages": size_after["processed_messages"],
            "ledger": size_after["ledger_rows"],
        },
    }


def print_history(result: dict[str, Any]) -> None:
    print(f"\nhistory: a user with {result['past_jobs']:,} past jobs against a fresh one")
    print(f"{'':<14}{'fresh p50':>11}{'p99':>8}{'long p50':>11}{'p99':>8}{'p99 ratio':>11}")
    for phase in ("before_prune", "after_prune"):
        f = result[phase]
        print(
            f"{phase:<14}{f['fresh_p50_ms']:>11}{f['fresh_p99_ms']:>8}"
            f"{f['long_standing_p50_ms']:>11}{f['long_standing_p99_ms']:>8}{f['p99_ratio']:>11}"
        )
    print(f"prune: {result['prune_output']}")
    print(
        f"database: {result['database_mb_before_prune']} MB before, "
        f"{result['database_mb_after_prune_and_vacuum_full']} MB after prune and VACUUM FULL "
        f"(rows {result['rows_before_prune']} -> {result['rows_after_prune']})"
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="canvas-bench-") as tmp:
        print_history(asyncio.run(run_history(Path(tmp))))
