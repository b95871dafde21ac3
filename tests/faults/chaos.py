"""``make chaos``: a soak in the spirit of Jepsen's nemesis.

Two replicas of every service run as real processes against a PostgreSQL cluster and a
RabbitMQ node of the soak's own (tests/support/servers.py), while jobs flow at a steady
rate: fast ones, slow ones, streamed ones (all of them stream), ones whose first model
call fails, ones the model refuses for good, and ones the user cancels midway. For the
set time a nemesis picks a fault every few seconds:

- ``kill``: kill -9 of a random service process, started again a few seconds later;
- ``freeze``: SIGSTOP of a random service process for 5 to 20 s, then SIGCONT;
- ``connections``: the broker closes every connection, or one process's;
- ``read_only``: the database refuses writes for 3 to 10 s, its sessions dropped;
- ``db_restart``: PostgreSQL restarted (``pg_ctl restart -m fast``);
- ``model_errors``: the model answers half its calls with 429 or 500 for 3 to 10 s;
- ``model_hang``: the model leaves a third of its calls unanswered for 5 to 10 s.

Faults overlap, but never two on one resource (a process, the database, the model) at
once. At the end everything is healed, submissions stop, and every job is checked from
outside, as a user and an operator would:

- each accepted job is final (else *stranded*), and listed (else *lost*);
- each completed job's objects are on its canvas exactly once (*duplicated*, *missing*);
- each job's history holds its attempts one after another, and only an attempt's newest
  run counts (*history problems*);
- each cancel answered 202 ended ``cancelled`` (*cancels lost*);
- no request was answered 500 (*server errors*);
- each WebSocket client (one per notifier, reconnecting with ``after``) saw every
  completion and cancellation, each event once and in order (*WebSocket problems*);
- *extra model calls*: calls beyond one per run the job's history records (a run cut
  off before its GenerationStarted was recorded); reported, not a failure.

It prints the counts and the faults injected by kind, writes them to
``bench/results/chaos-<time>.json``, and exits 1 on any loss (every check above but the
last), else 0. ``python -m tests.faults.chaos --minutes 1`` for a short run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.faults.harness import (
    FINAL,
    Client,
    Submitted,
    Watcher,
    attempt_problems,
    calls_of,
    check_outcome,
    query,
    run_problems,
    set_read_only,
)
from tests.support.env import create_database
from tests.support.servers import PrivatePostgres, PrivateRabbitMQ
from tests.support.system import System

USER = "chaos-user"
SERVICES = (
    "orchestrator",
    "orchestrator-2",
    "generator",
    "generator-2",
    "notifier",
    "notifier-2",
    "gateway",
    "gateway-2",
)
REPLICAS = [
    ("orchestrator", "orchestrator-2"),
    ("generator", "generator-2"),
    ("notifier", "notifier-2"),
    ("gateway", "gateway-2"),
]
# Short leases and backoffs, so that the jobs a fault cut off end within the final wait.
SETTINGS = {
    "MAX_ACTIVE_JOBS_PER_USER": "100000",
    "MAX_JOB_RETRIES": "6",
    "RETRY_BACKOFF_UNIT_SECONDS": "0.5",
    "RETRY_BACKOFF_BASE": "2",
    "OPENAI_TIMEOUT_SECONDS": "10",
    "GENERATION_LEASE_SECONDS": "30",
    "GENERATION_START_TIMEOUT_SECONDS": "120",
    "MAX_CONCURRENT_JOBS": "10",
    "SHUTDOWN_GRACE_SECONDS": "5",
    "LEDGER_RESEND_AFTER_SECONDS": "15",
}
# What a job does, and how often it is drawn.
KINDS = {"fast": 35, "slow": 20, "retried": 10, "refused": 5, "cancelled": 30}
FAULTS = (
    "kill",
    "freeze",
    "connections",
    "read_only",
    "db_restart",
    "model_errors",
    "model_hang",
)
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@dataclass
class Job:
    """One job the soak submitted, and what the API answered about it."""

    index: int
    kind: str
    text: str
    job_id: str | None = None
    canvas_id: str | None = None
    cancel_code: int | None = None


@dataclass
class Tally:
    """Every answer and fault of a run."""

    answers: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)


def _text(index: int, kind: str) -> str:
    match kind:
        case "slow":
            return query(index, delay_ms=2000)
        case "retried":
            return query(index, extra="first=1,status=500")
        case "refused":
            return query(index, extra="status=400")
        case "cancelled":
            return query(index, delay_ms=3000)
        case _:
            return query(index)


class Workload:
    """Submits jobs at a steady rate through both gateways, as a patient client would:
    a 503 or a dropped connection is tried again with the same Idempotency-Key."""

    def __init__(self, system: System, rate: float, rng: random.Random, tally: Tally) -> None:
        self._clients = [Client(system, USER, gateway=name) for name in ("gateway", "gateway-2")]
        self._rate = rate
        self._rng = rng
        self._tally = tally
        self.jobs: list[Job] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        index = 0
        while not stop.is_set():
            kind = self._rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            job = Job(index, kind, _text(index, kind))
            self.jobs.append(job)
            task = asyncio.create_task(self._submit(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            index += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / self._rate)

    async def drain(self) -> None:
        """Wait for the submissions (and cancels) still in hand."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        for client in self._clients:
            await client.http.aclose()

    async def _submit(self, job: Job) -> None:
        key = str(uuid.uuid4())
        answer = await self._patiently(
            "create",
            lambda client: client.http.post(
                "/api/ai-agent/create-canvas",
                json={"query": job.text},
                headers={"Idempotency-Key": key},
            ),
        )
        if answer is None or answer.status_code != 202:
            return
        body = answer.json()
        job.job_id, job.canvas_id = body["job_id"], body["canvas_id"]
        if job.kind == "cancelled":
            await asyncio.sleep(self._rng.uniform(0, 2))
            cancel = await self._patiently(
                "cancel",
                lambda client: client.http.post(f"/api/ai-agent/job/{job.job_id}/cancel"),
            )
            job.cancel_code = cancel.status_code if cancel is not None else None

    async def _patiently(
        self, what: str, call: Callable[[Client], Awaitable[httpx.Response]]
    ) -> httpx.Response | None:
        """The answer to ``call`` on a random gateway, tried again for up to two minutes
        while the answer is a 503 or no answer at all."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            client = self._rng.choice(self._clients)
            try:
                answer = await call(client)
            except httpx.TransportError:
                self._tally.answers[f"{what}:no answer"] += 1
                await asyncio.sleep(0.5)
                continue
            self._tally.answers[f"{what}:{answer.status_code}"] += 1
            if answer.status_code >= 500 and answer.status_code != 503:
                self._tally.server_errors.append(
                    f"{what}: {answer.status_code} {answer.text[:200]}"
                )
            if answer.status_code not in (503, 429):
                return answer
            await asyncio.sleep(min(2.0, float(answer.headers.get("Retry-After", "1"))))
        return None


@dataclass(eq=False)
class Nemesis:
    """Picks a fault every few seconds; each fault heals itself after its time, and
    :meth:`heal` heals whatever is still broken."""

    system: System
    broker: PrivateRabbitMQ
    database: PrivatePostgres
    rng: random.Random
    tally: Tally
    _busy: set[str] = field(init=False, default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(2, 6))
            if stop.is_set():
                return
            kind = self.rng.choice(FAULTS)
            resource = self._resource(kind)
            if resource is None:
                continue
            self._busy.add(resource)
            self.tally.faults[kind] += 1
            task = asyncio.create_task(self._inflict(kind, resource))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resource(self, kind: str) -> str | None:
        """A resource ``kind`` may break now (None: all taken)."""
        if kind in ("kill", "freeze"):
            free = [name for name in SERVICES if name not in self._busy]
            return self.rng.choice(free) if free else None
        resource = {"read_only": "database", "db_restart": "database"}.get(kind, kind)
        if kind.startswith("model"):
            resource = "model"
        return None if resource in self._busy else resource

    async def _inflict(self, kind: str, resource: str) -> None:
        try:
            match kind:
                case "kill":
                    process = self.system.processes[resource]
                    process.kill()
                    await asyncio.sleep(self.rng.uniform(1, 4))
                    process.start()
                case "freeze":
                    process = self.system.processes[resource]
                    process.freeze()
                    try:
                        await asyncio.sleep(self.rng.uniform(5, 20))
                    finally:
                        process.thaw()
                case "connections":
                    # Every connection, or one process's.
                    of_pid = None
                    process = self.system.processes[self.rng.choice(SERVICES)]
                    if self.rng.random() < 0.5 and process.process is not None:
                        of_pid = process.pid
                    await asyncio.to_thread(
                        functools.partial(self.broker.close_connections, of_pid=of_pid)
                    )
                case "read_only":
                    await set_read_only(self.system.database_url, True)
                    try:
                        await asyncio.sleep(self.rng.uniform(3, 10))
                    finally:
                        await set_read_only(self.system.database_url, False)
                case "db_restart":
                    await asyncio.to_thread(self.database.restart)
                case "model_errors" | "model_hang":
                    modes = "429,500" if kind == "model_errors" else "timeout"
                    rate = 0.5 if kind == "model_errors" else 0.3
                    await self._model({"failure_rate": rate, "failure_modes": modes})
                    try:
                        await asyncio.sleep(self.rng.uniform(3, 10))
                    finally:
                        await self._model({"failure_rate": 0})
        except Exception as exc:
            print(f"chaos: fault {kind} on {resource} failed: {exc!r}", file=sys.stderr)
        finally:
            self._busy.discard(resource)

    async def _model(self, change: dict[str, Any]) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            await http.put(f"{self.system.fake_openai_url}/_fake/config", json=change)

    async def heal(self) -> None:
        """Let every fault in progress end (each heals itself), then make sure: every
        process runs and is thawed, the database writable, the model healthy."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        for name in SERVICES:
            process = self.system.processes[name]
            process.thaw()
            if process.process is None or process.process.poll() is not None:
                process.start()
        if not self.database.running():
            await asyncio.to_thread(self.database.start)
        await set_read_only(self.system.database_url, False)
        await self._model({"failure_rate": 0})
        await asyncio.gather(*(self.system.processes[name].wait_ready(120) for name in SERVICES))


async def soak(minutes: float, rate: float, seed: int, settle_seconds: float) -> dict[str, Any]:
    """One run; the report."""
    rng = random.Random(seed)
    tally = Tally()
    logs = Path(tempfile.mkdtemp(prefix="cj-chaos-"))
    with PrivateRabbitMQ() as broker, PrivatePostgres() as database:
        await create_database(database.url("canvas_chaos"))
        system = System(database.url("canvas_chaos"), broker.url, "chaos", logs, extra_env=SETTINGS)
        for kind, name in REPLICAS:
            system.add_replica(kind, name)
        await system.start()
        try:
            return await _run(system, broker, database, minutes, rate, settle_seconds, rng, tally)
        finally:
            system.stop()
            print(f"chaos: logs in {logs}", flush=True)


async def _run(
    system: System,
    broker: PrivateRabbitMQ,
    database: PrivatePostgres,
    minutes: float,
    rate: float,
    settle_seconds: float,
    rng: random.Random,
    tally: Tally,
) -> dict[str, Any]:
    workload = Workload(system, rate, rng, tally)
    nemesis = Nemesis(system, broker, database, rng, tally)
    watchers = [Watcher(system, USER, notifier=name) for name in ("notifier", "notifier-2")]
    started = time.monotonic()
    async with watchers[0], watchers[1]:
        stop = asyncio.Event()
        running = [
            asyncio.create_task(workload.run(stop)),
            asyncio.create_task(nemesis.run(stop)),
        ]
        await asyncio.sleep(minutes * 60)
        stop.set()
        await asyncio.gather(*running)
        print("chaos: healing", flush=True)
        await nemesis.heal()
        await workload.drain()
        accepted = [job for job in workload.jobs if job.job_id is not None]
        print(f"chaos: waiting for {len(accepted)} jobs to end", flush=True)
        async with Client(system, USER) as client:
            submitted = [
                Submitted(job.job_id, job.canvas_id or "") for job in accepted if job.job_id
            ]
            statuses = await client.wait_final(submitted, timeout=settle_seconds)
            outcome = await check_outcome(client, submitted, statuses)
        done = {job_id for job_id, status in statuses.items() if status["status"] in FINAL}
        with contextlib.suppress(AssertionError):
            for watcher in watchers:
                wanted = {job_id for job_id in done if statuses[job_id]["status"] == "completed"}
                await watcher.wait_completed(wanted, timeout=30)
        calls = system.stand_in.calls()
    elapsed = time.monotonic() - started
    return _report(workload, watchers, statuses, outcome, calls, tally, elapsed)


def _report(
    workload: Workload,
    watchers: list[Watcher],
    statuses: dict[str, dict[str, Any]],
    outcome: Any,
    calls: dict[str, int],
    tally: Tally,
    elapsed: float,
) -> dict[str, Any]:
    accepted = [job for job in workload.jobs if job.job_id is not None]
    stranded = [
        job.job_id
        for job in accepted
        if statuses.get(job.job_id or "", {}).get("status") not in FINAL
    ]
    missing = [job.job_id for job in accepted if job.job_id not in statuses]
    cancels_lost = [
        job.job_id
        for job in accepted
        if job.cancel_code == 202
        and statuses.get(job.job_id or "", {}).get("status") != "cancelled"
    ]
    history = [
        f"{job_id}: {problem}"
        for job_id, events in outcome.events.items()
        for problem in attempt_problems(events) + run_problems(events)
    ]
    websocket: list[str] = []
    for watcher in watchers:
        websocket += [f"{watcher.notifier}: {problem}" for problem in watcher.problems()]
        completed = {
            job_id for job_id, status in statuses.items() if status["status"] == "completed"
        }
        unseen = completed - watcher.completed()
        if unseen:
            websocket.append(f"{watcher.notifier}: {len(unseen)} completions never seen")
    extra_calls = 0
    for job in accepted:
        runs = {
            event["data"].get("run_id")
            for event in outcome.events.get(job.job_id or "", [])
            if event["type"] == "GenerationStarted"
        }
        extra_calls += max(0, calls_of(calls, job.text) - len(runs))
    by_status = Counter(
        statuses.get(job.job_id or "", {}).get("status", "unknown") for job in accepted
    )
    report = {
        "finished_at": datetime.now(UTC).isoformat(),
        "seconds": round(elapsed, 1),
        "jobs_submitted": len(workload.jobs),
        "jobs_accepted": len(accepted),
        "jobs_by_status": dict(by_status),
        "jobs_by_kind": dict(Counter(job.kind for job in accepted)),
        "faults": dict(tally.faults),
        "answers": dict(tally.answers),
        "lost": len(missing),
        "stranded": len(stranded),
        "duplicated_objects": outcome.duplicated_objects,
        "missing_objects": outcome.missing_objects,
        "cancels_answered_202": sum(1 for job in accepted if job.cancel_code == 202),
        "cancels_lost": len(cancels_lost),
        "server_errors": len(tally.server_errors),
        "history_problems": len(history),
        "websocket_problems": len(websocket),
        "websocket_reconnects": [watcher.connects - 1 for watcher in watchers],
        "model_calls": sum(calls.values()),
        "extra_model_calls": extra_calls,
        "problems": (outcome.problems + history + websocket + tally.server_errors)[:50],
    }
    report["failed"] = any(
        report[name]
        for name in (
            "lost",
            "stranded",
            "duplicated_objects",
            "missing_objects",
            "cancels_lost",
            "server_errors",
            "history_problems",
            "websocket_problems",
        )
    )
    return report


def _print(report: dict[str, Any]) -> None:
    print("chaos: " + ("FAILED" if report["failed"] else "passed"), flush=True)
    for name in (
        "seconds",
        "jobs_submitted",
        "jobs_accepted",
        "jobs_by_status",
        "jobs_by_kind",
        "faults",
        "lost",
        "stranded",
        "duplicated_objects",
        "missing_objects",
        "cancels_answered_202",
        "cancels_lost",
        "server_errors",
        "history_problems",
        "websocket_problems",
        "websocket_reconnects",
        "model_calls",
        "extra_model_calls",
    ):
        print(f"  {name}: {report[name]}", flush=True)
    for problem in report["problems"][:20]:
        print(f"  problem: {problem}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long faults go on")
    parser.add_argument("--rate", type=float, default=3.0, help="jobs submitted per second")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random choices")
    parser.add_argument(
        "--settle", type=float, default=240.0, help="seconds the jobs get to end after healing"
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    print(f"chaos: {args.minutes:g} min, {args.rate:g} jobs/s, seed {seed}", flush=True)
    report = asyncio.run(soak(args.minutes, args.rate, seed, args.settle))
    report["seed"] = seed
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"chaos-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2))
    _print(report)
    print(f"chaos: report in {out}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
