"""`make bench SCENARIO=orchestrators`: jobs four orchestrator processes record against
one PostgreSQL, and whether a reader of the event store ever skips an event meanwhile.

Each orchestrator process runs the orchestrator's own recording path (the message
handler, its group commit, the Committer: lock rows, dedupe, load, decide, project,
append, commit) with the broker left out: it hands the handler a JobRequested, then the
GenerationStarted and GenerationSucceeded a generator would send (the attempt id read
back from the job's row), for up to ``--in-flight`` jobs at once, for ``--seconds``. What
is measured is the store's side of a fleet: how many jobs per second the recording
transactions of several processes get through together, with nothing else on the
machine competing but PostgreSQL.

A fifth process reads the event store as the relay does (``read_after`` from the last
position read) and checks that every position it reads is above the one before; at the
end it must have read exactly as many events as the store holds. A reader that skipped
an event (a smaller position committed after a larger one was read) fails the run.

    .venv/bin/python -m bench.orchestrators [--processes 4] [--seconds 10] [--in-flight 64]
    .venv/bin/python -m bench.orchestrators --in-flight 4 --commit-rtt-ms 5

``--commit-rtt-ms`` makes each transaction wait that long between its append and its
commit, as a database that far away would: small transactions (few jobs in flight)
whose commits wait are where appends taking turns would cap a fleet.

Results: a summary on stdout and JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import uuid
from asyncio.subprocess import PIPE
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

from bench.machine import busy_pct, machine_ticks
from canvas_events.broker import Ack
from canvas_events.envelope import Envelope, utcnow
from canvas_events.events import GenerationStarted, GenerationSucceeded, JobRequested
from canvas_events.logging import configure_logging
from canvas_events.postgres import Database
from canvas_orchestrator.committer import Committer, Transaction
from canvas_orchestrator.domain import Policy
from canvas_orchestrator.handlers import Handler
from canvas_orchestrator.metrics import Metrics
from canvas_store.connections import init_connection
from canvas_store.events import read_after
from canvas_store.migrations import migrate
from tests.support.env import create_database, database_url, drop_database

RESULTS = Path(__file__).parent / "results"
USERS_PER_PROCESS = 16
OBJECT = {"type": "rectangle", "x": 10, "y": 10, "width": 120, "height": 60}


async def _one_job(handler: Handler, pool: asyncpg.Pool, user: str) -> bool:
    """A job's three recording transactions; False when one was not acked."""
    job_id = uuid.uuid4()
    canvas_id = f"canvas-{user}"
    requested = Envelope.wrap(
        JobRequested(query="a flowchart", canvas_id=canvas_id, priority=5),
        correlation_id=f"bench-{job_id}",
        job_id=job_id,
        user_id=user,
        canvas_id=canvas_id,
    )
    if not isinstance(await handler.handle_envelope(requested), Ack):
        return False
    attempt_id = await pool.fetchval("SELECT attempt_id FROM jobs WHERE id = $1", job_id)
    run_id = uuid.uuid4()
    started = GenerationStarted(
        attempt_id=attempt_id, model="bench", generator_id="bench", run_id=run_id
    )
    succeeded = GenerationSucceeded(
        attempt_id=attempt_id,
        objects=[OBJECT],
        dropped_objects=0,
        model="bench",
        latency_ms=0,
        run_id=run_id,
    )
    for event in (started, succeeded):
        if not isinstance(await handler.handle_envelope(requested.follow(event)), Ack):
            return False
    return True


def _delay_commits(seconds: float) -> None:
    """Make every recording transaction wait ``seconds`` between its append and its
    commit: the commit's round trip to a database that far away (a managed one, another
    zone). Until 0006 the store's append lock was held for it."""
    append = Transaction._flush

    async def flush_then_wait(self: Transaction) -> None:
        await append(self)
        await asyncio.sleep(seconds)

    Transaction._flush = flush_then_wait  # type: ignore[method-assign]


async def orchestrator(
    url: str, index: int, seconds: float, in_flight: int, commit_rtt_ms: float = 0.0
) -> dict[str, Any]:
    """One orchestrator process's run: jobs recorded, failures, CPU."""
    if commit_rtt_ms:
        _delay_commits(commit_rtt_ms / 1000)
    database = Database(url, max_size=20, init=init_connection)
    await database.start()
    await database.wait_ready(30)
    metrics = Metrics(CollectorRegistry())
    committer = Committer(database, clock=utcnow)
    handler = Handler(committer, Policy(), metrics)
    deadline = time.monotonic() + seconds
    tally = {"jobs": 0, "failed": 0}

    async def lane(lane_index: int) -> None:
        user = f"user-{index}-{lane_index % USERS_PER_PROCESS}"
        while time.monotonic() < deadline:
            ok = await _one_job(handler, database.pool, user)
            tally["jobs" if ok else "failed"] += 1

    started = time.monotonic()
    await asyncio.gather(*(lane(n) for n in range(in_flight)))
    elapsed = time.monotonic() - started
    await database.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {**tally, "seconds": elapsed, "cpu_seconds": usage.ru_utime + usage.ru_stime}


async def reader(url: str) -> dict[str, Any]:
    """Read the store after the last position read until stdin closes and nothing is
    left; count what was read and every position not above the last."""
    conn = await asyncpg.connect(url)
    await init_connection(conn)
    told = asyncio.ensure_future(asyncio.to_thread(sys.stdin.read))
    last, read, out_of_order, reads = 0, 0, 0, 0
    try:
        while True:
            stopping = told.done()
            batch = await read_after(conn, last, 1000)
            reads += 1
            for item in batch:
                if item.position <= last:
                    out_of_order += 1
                last = max(last, item.position)
                read += 1
            if not batch:
                if stopping:
                    break
                await asyncio.sleep(0.005)
    finally:
        await conn.close()
    return {"events_read": read, "out_of_order": out_of_order, "reads": reads}


async def run_fleet(
    processes: int = 4, seconds: float = 10.0, in_flight: int = 64, commit_rtt_ms: float = 0.0
) -> dict[str, Any]:
    """The whole measurement (see the module docstring); its result, also written to
    bench/results/ and summed up on stdout. ``result["ok"]``: nothing failed or skipped."""
    name = f"canvas_bench_orchestrators_{os.getpid()}"
    url = database_url(name)
    await create_database(url)
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        worker = [sys.executable, "-m", "bench.orchestrators", "--database", url]
        pipes: dict[str, Any] = {"stdin": PIPE, "stdout": PIPE}
        read = await asyncio.create_subprocess_exec(*worker, "--role", "reader", **pipes)
        options = ["--seconds", str(seconds), "--in-flight", str(in_flight)]
        options += ["--commit-rtt-ms", str(commit_rtt_ms)]
        fleet = [
            await asyncio.create_subprocess_exec(
                *worker, "--role", "orchestrator", "--index", str(index), *options, **pipes
            )
            for index in range(processes)
        ]
        before = machine_ticks()
        outputs = [json.loads((await process.communicate())[0]) for process in fleet]
        busy = busy_pct(before, machine_ticks())
        # Closing its stdin (what communicate does with an input) tells the reader the
        # writers are done.
        checked = json.loads((await read.communicate(b""))[0])
        conn = await asyncpg.connect(url)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM events")
            completed = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'completed'")
        finally:
            await conn.close()
    finally:
        await drop_database(url)
    figures: dict[str, Any] = {"processes": processes, "in_flight_per_process": in_flight}
    figures["commit_rtt_ms"] = commit_rtt_ms
    return _report(figures, outputs, checked, stored, completed, busy)


def _report(
    figures: dict[str, Any],
    outputs: list[dict[str, Any]],
    checked: dict[str, Any],
    stored: int,
    completed: int,
    busy: float,
) -> dict[str, Any]:
    seconds = max(output["seconds"] for output in outputs)
    jobs = sum(output["jobs"] for output in outputs)
    failed = sum(output["failed"] for output in outputs)
    skipped = stored - checked["events_read"]
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        **figures,
        "seconds": round(seconds, 2),
        "jobs_completed": completed,
        "jobs_per_s": round(jobs / seconds, 1),
        "events_per_s": round(stored / seconds, 1),
        "failed": failed,
        "machine_busy_pct": busy,
        "events_stored": stored,
        "reader": {**checked, "skipped": skipped},
        "cpu_ms_per_job": round(
            1000 * sum(output["cpu_seconds"] for output in outputs) / max(jobs, 1), 2
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (RESULTS / f"orchestrators-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{figures['processes']} orchestrator processes, {figures['in_flight_per_process']} "
        f"jobs in flight each, commits {figures['commit_rtt_ms']} ms away, "
        f"{result['seconds']} s: {result['jobs_per_s']} jobs/s ({jobs} jobs, "
        f"{result['events_per_s']} events/s), {failed} failed, orchestrator CPU "
        f"{result['cpu_ms_per_job']} ms/job, machine {busy}% busy; the reader read "
        f"{checked['events_read']} of {stored} events, {checked['out_of_order']} out of "
        f"order, {skipped} skipped"
    )
    result["ok"] = not (failed or skipped or checked["out_of_order"] or completed != jobs)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, default=64, help="jobs at once per process")
    parser.add_argument(
        "--commit-rtt-ms", type=float, default=0.0, help="a wait between append and commit"
    )
    parser.add_argument("--role", choices=["main", "orchestrator", "reader"], default="main")
    parser.add_argument("--database")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    # A worker's stdout carries its one JSON answer.
    configure_logging("bench", "WARNING", stream=sys.stderr)
    if args.role == "orchestrator":
        run = orchestrator(
            args.database, args.index, args.seconds, args.in_flight, args.commit_rtt_ms
        )
        print(json.dumps(asyncio.run(run)))
        return 0
    if args.role == "reader":
        print(json.dumps(asyncio.run(reader(args.database))))
        return 0
    fleet = run_fleet(args.processes, args.seconds, args.in_flight, args.commit_rtt_ms)
    result = asyncio.run(fleet)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
