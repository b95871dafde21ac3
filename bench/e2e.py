"""`make bench`: the whole system as real processes, driven through its public API.

Starts the four services and the stand-in model (at a set latency) against a scratch
database and topology prefix, submits N jobs from concurrent HTTP clients spread over
several users, each user listening on one WebSocket, and reports throughput, latency
percentiles and each service's memory and CPU (and that of RabbitMQ, PostgreSQL and the
clients themselves, and how busy the machine was). In the same run it measures a reference,
raw aio-pika publish-with-confirm → consume-with-ack on the same broker, so that jobs/s
can be compared across machines as a ratio to it.

    .venv/bin/python -m bench.e2e                        # every scenario
    .venv/bin/python -m bench.e2e --scenario 0ms --jobs 300

Results: a table on stdout and JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import httpx
import websockets

from bench.history import print_history, run_history
from bench.machine import busy_pct, machine_ticks
from bench.orchestrators import run_fleet
from bench.sharing import print_sharing, run_budget, run_fair
from tests.support.env import amqp_url
from tests.support.system import System, running_system

RESULTS = Path(__file__).parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Scenario:
    name: str
    jobs: int
    model_latency_ms: int
    max_concurrent_jobs: int
    clients: int = 32
    users: int = 8
    # One job at a time, each posted after the last completed: pickup on an idle system.
    sequential: bool = False
    stream: bool = True
    # Between streamed chunks (a reply is about 64 of them): a real model's pace.
    chunk_delay_ms: int = 0


@dataclass
class JobTimes:
    posted: float
    accepted: float | None = None
    started: float | None = None
    completed: float | None = None
    failed: bool = False
    user: str = ""
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None


@dataclass
class ProcessSample:
    rss_idle_kb: int
    cpu_ticks_before: int
    rss_peak_kb: int = 0
    cpu_ticks_after: int = 0


@dataclass
class Run:
    scenario: Scenario
    times: dict[str, JobTimes] = field(default_factory=dict)
    processes: dict[str, ProcessSample] = field(default_factory=dict)
    # POSTs sent again after the connection broke (with the same Idempotency-Key).
    post_retries: int = 0
    ws_reconnects: int = 0  # WebSockets opened again with after= (see _listen)


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _infra_ticks() -> dict[str, int]:
    """CPU ticks so far of the machine's RabbitMQ (beam.smp) and of every PostgreSQL
    process (its backends live as long as the services' pools, so the difference over a
    run is what the run cost them)."""
    ticks = {"rabbitmq": 0, "postgres": 0}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            if comm.startswith("beam"):
                ticks["rabbitmq"] += _cpu_ticks(int(entry.name))
            elif comm.startswith("postgres"):
                ticks["postgres"] += _cpu_ticks(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
    return ticks


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def reference_throughput(url: str, messages: int = 20_000, window: int = 100) -> float:
    """Raw aio-pika: publish with confirms (``window`` in flight) and consume with acks on
    a throwaway queue; messages per second end to end."""
    connection = await aio_pika.connect(url)
    async with connection:
        publish_channel = await connection.channel(publisher_confirms=True)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=window)
        queue = await consume_channel.declare_queue(
            f"bench.reference.{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True
        )
        received = 0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received == messages:
                done.set()

        await queue.consume(on_message)
        body = b'{"type": "reference", "data": {}}' * 4
        semaphore = asyncio.Semaphore(window)

        async def publish_one() -> None:
            async with semaphore:
                await publish_channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    queue.name,
                )

        start = time.perf_counter()
        await asyncio.gather(*(publish_one() for _ in range(messages)))
        await asyncio.wait_for(done.wait(), 120)
        return messages / (time.perf_counter() - start)


async def _listen(system: System, user: str, run: Run) -> None:
    """Record the frames of ``user``'s jobs until cancelled: one ``recv`` each, no task
    or timer per frame (the clients share the cores with what they measure). A dropped
    connection (a client starved past its ping timeout closes with 1006) is opened
    again with ``after=`` the last position seen, as the API tells clients to: the
    notifier replays what was missed, and a job is never counted lost for it."""
    token = system.token(user)
    after: int | None = None
    while True:
        try:
            url = system.websocket_url(token, after)
            async with websockets.connect(url, max_size=None) as ws:
                async for raw in ws:
                    frame = json.loads(raw)
                    after = max(after or 0, frame.get("position") or 0)
                    _record(frame, run, time.perf_counter())
        except (websockets.ConnectionClosed, OSError):
            pass
        run.ws_reconnects += 1
        await asyncio.sleep(0.2)


def _record(frame: dict[str, Any], run: Run, now: float) -> None:
    times = run.times.get(frame.get("job_id", ""))
    if times is None:
        return
    kind = frame["type"]
    if kind == "ai_generation_started" and times.started is None:
        times.started = now
    elif kind == "ai_generation_completed" and times.completed is None:
        times.completed = now
        times.finished.set()
    elif kind == "ai_job_error" and frame["data"].get("final") and times.completed is None:
        times.failed = True
        times.completed = now
        times.finished.set()


async def _post(http: aiohttp.ClientSession, run: Run, index: int, token: str) -> tuple[int, Any]:
    """Ask for job ``index`` as a careful client does: a connection that breaks is tried
    again, with the same Idempotency-Key (the same job, never a second one). Counted.
    The status and the JSON answer (its text when it is not JSON)."""
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": f"bench-{index}"}
    body = {"query": f"bench job {index}: a flowchart of a login flow"}
    for tries_left in (2, 1, 0):
        try:
            async with http.post("/api/ai-agent/create-canvas", json=body, headers=headers) as r:
                text = await r.text()
                with contextlib.suppress(ValueError):
                    return r.status, json.loads(text)
                return r.status, text
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
            if not tries_left:
                raise
            run.post_retries += 1
    raise AssertionError("unreachable")


WARM_UP_JOBS = 3


async def warm_up(system: System) -> None:
    """A few jobs, one at a time, before anything is measured: the first job after a
    start opens connections and pools in every service (120 to 700 ms of pickup here),
    which would otherwise be the idle scenario's p99."""
    headers = {"Authorization": f"Bearer {system.token('bench-warm-up')}"}
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
        for index in range(WARM_UP_JOBS):
            answer = await http.post(
                "/api/ai-agent/create-canvas",
                json={"query": f"warm-up job {index}: a flowchart of a login flow"},
                headers=headers,
            )
            answer.raise_for_status()
            status_url = f"/api/ai-agent/job/{answer.json()['job_id']}/status"
            deadline = time.perf_counter() + 60
            while time.perf_counter() < deadline:
                status = (await http.get(status_url, headers=headers)).json()["status"]
                if status in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"warm-up job {index} did not finish in 60 s")


async def drive(system: System, scenario: Scenario, run: Run) -> None:
    users = [f"bench-user-{i}" for i in range(scenario.users)]
    listeners = [asyncio.create_task(_listen(system, user, run)) for user in users]
    await asyncio.sleep(0.5)  # let every WebSocket register before the first job
    pending: asyncio.Queue[int] = asyncio.Queue()
    for index in range(scenario.jobs):
        pending.put_nowait(index)
    tokens = {user: system.token(user) for user in users}
    # aiohttp, not httpx: httpx's pool looked at each of its 64 connections (a poll of
    # each socket) for every request, and the clients cost 8 ms per job in `10s`.
    connector = aiohttp.TCPConnector(limit=scenario.clients)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        system.gateway_url, connector=connector, timeout=timeout
    ) as http:

        async def client() -> None:
            while True:
                try:
                    index = pending.get_nowait()
                except asyncio.QueueEmpty:
                    return
                user = users[index % len(users)]
                posted = time.perf_counter()
                status, answer = await _post(http, run, index, tokens[user])
                if status != 202:
                    raise RuntimeError(f"POST answered {status}: {answer}")
                job_id = answer["job_id"]
                # The WebSocket may see the job's first frames before the POST returns.
                times = run.times.setdefault(job_id, JobTimes(posted))
                times.posted, times.accepted = posted, time.perf_counter()
                times.user = user
                if scenario.sequential:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(times.finished.wait(), 60)

        await asyncio.gather(*(client() for _ in range(scenario.clients)))
    deadline = time.perf_counter() + 60 + scenario.jobs * scenario.model_latency_ms / 1000
    while time.perf_counter() < deadline:
        if len(run.times) == scenario.jobs and all(t.completed for t in run.times.values()):
            break
        await asyncio.sleep(0.1)
    for listener in listeners:
        listener.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    # Say why: a benchmark that loses or fails jobs is a bug report, not a figure.
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as status_http:
        for job_id, times in run.times.items():
            if times.failed or not times.completed:
                answer = await status_http.get(
                    f"/api/ai-agent/job/{job_id}/status",
                    headers={"Authorization": f"Bearer {tokens[times.user]}"},
                )
                body = answer.json()
                times.error = f"{body.get('status')}: {body.get('error_message')}"


def summarise(run: Run, reference: float) -> dict[str, Any]:
    times = list(run.times.values())
    done = [t for t in times if t.completed and not t.failed]
    first_post = min(t.posted for t in times)
    last_accept = max(t.accepted or 0 for t in times)
    last_done = max((t.completed or 0) for t in times)
    completed_per_s = len(done) / (last_done - first_post) if done else 0.0
    pickup = [(t.started - t.posted) * 1000 for t in times if t.started]
    total = [(t.completed - t.posted) * 1000 for t in done if t.completed]
    processes = {
        name: {
            "rss_idle_mb": round(sample.rss_idle_kb / 1024, 1),
            "rss_peak_mb": round(sample.rss_peak_kb / 1024, 1),
            "cpu_ms_per_job": round(
                (sample.cpu_ticks_after - sample.cpu_ticks_before)
                / CLK_TCK
                * 1000
                / max(1, len(times)),
                3,
            ),
        }
        for name, sample in run.processes.items()
    }
    return {
        "scenario": run.scenario.__dict__,
        "submitted": run.scenario.jobs,
        "accepted": sum(1 for t in times if t.accepted),
        "completed": len(done),
        "failed": sum(1 for t in times if t.failed),
        "lost": run.scenario.jobs - sum(1 for t in times if t.completed),
        "accepted_jobs_per_s": round(len(times) / (last_accept - first_post), 1),
        "completed_jobs_per_s": round(completed_per_s, 1),
        "pickup_ms": {q: round(_pct(pickup, q), 1) for q in (50, 95, 99)},
        "completion_ms": {q: round(_pct(total, q), 1) for q in (50, 95, 99)},
        "reference_msgs_per_s": round(reference, 0),
        "completed_per_reference": round(completed_per_s / reference, 4) if reference else None,
        "processes": processes,
        "errors": sorted({t.error for t in times if t.error}),
        "post_retries": run.post_retries,
        "ws_reconnects": run.ws_reconnects,
    }


async def orchestrator_figures(system: System, jobs: int) -> dict[str, float]:
    """From the orchestrator's /metrics: messages per transaction, and the time from each
    transaction's append to its commit, per transaction and per job (appends no longer
    take turns on a lock: ``make bench SCENARIO=orchestrators`` measures a fleet)."""
    url = f"http://127.0.0.1:{system.ports['orchestrator']}/metrics"
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(url)).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(
            ("canvas_orchestrator_batch_messages_", "canvas_orchestrator_append_commit_")
        ) and name.endswith(("_sum", "_count")):
            values[name.removeprefix("canvas_orchestrator_")] = float(value)
    transactions = values.get("batch_messages_count", 0.0)
    appends = values.get("append_commit_seconds_count", 0.0)
    held = values.get("append_commit_seconds_sum", 0.0)
    return {
        "transactions": transactions,
        "messages_per_transaction": round(values.get("batch_messages_sum", 0.0) / transactions, 2)
        if transactions
        else 0.0,
        "append_commit_ms_per_append": round(1000 * held / appends, 3) if appends else 0.0,
        "append_commit_ms_per_job": round(1000 * held / jobs, 3) if jobs else 0.0,
    }


def start_profilers(system: System, names: list[str], scenario: str) -> list[Any]:
    """py-spy (when installed: `.venv/bin/pip install py-spy`) samples the named services
    during the run; collapsed stacks land in bench/results/profile-<service>-<scenario>.txt."""
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("bench: --profile needs py-spy (.venv/bin/pip install py-spy)")
    RESULTS.mkdir(exist_ok=True)
    procs = []
    for name in names:
        proc = system.processes[name].process
        assert proc is not None
        out = RESULTS / f"profile-{name}-{scenario}.txt"
        procs.append(
            subprocess.Popen(  # noqa: S603 (our own profiler on our own process)
                [
                    spy,
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--rate",
                    "200",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


def _cpu_only(ticks: int, jobs: int) -> dict[str, Any]:
    """A process row with CPU per job only (not one of the system's own processes)."""
    cpu_ms_per_job = round(ticks / CLK_TCK * 1000 / jobs, 3)
    return {"rss_idle_mb": None, "rss_peak_mb": None, "cpu_ms_per_job": cpu_ms_per_job}


async def run_scenario(
    scenario: Scenario,
    log_dir: Path,
    profile: list[str] | None = None,
    queue_type: str = "quorum",
) -> dict[str, Any]:
    env = {
        # The shared queues' type (AMQP_QUEUE_TYPE): the cost of quorum is classic's
        # numbers beside these, on the same machine.
        "AMQP_QUEUE_TYPE": queue_type,
        "FAKE_OPENAI_DELAY_MS": str(scenario.model_latency_ms),
        "FAKE_OPENAI_CHUNK_DELAY_MS": str(scenario.chunk_delay_ms),
        "MAX_CONCURRENT_JOBS": str(scenario.max_concurrent_jobs),
        "MAX_ACTIVE_JOBS_PER_USER": str(scenario.jobs + 10),
        "OPENAI_TIMEOUT_SECONDS": "60",
        "MAX_JOB_RETRIES": "3",
        "OPENAI_STREAM": "true" if scenario.stream else "false",
    }
    run = Run(scenario)
    async with running_system(log_dir, label="bench", extra_env=env) as system:
        await asyncio.sleep(1.0)  # settle: idle memory after start-up
        for pname, proc in system.processes.items():
            assert proc.process is not None
            pid = proc.process.pid
            run.processes[pname] = ProcessSample(_status_kb(pid, "VmRSS"), _cpu_ticks(pid))
        await warm_up(system)
        reference = await reference_throughput(amqp_url())
        # The reference ran on the same cores: take CPU baselines again after it.
        for pname, proc in system.processes.items():
            assert proc.process is not None
            run.processes[pname].cpu_ticks_before = _cpu_ticks(proc.process.pid)
        infra_before, machine_before = _infra_ticks(), machine_ticks()
        bench_before = _cpu_ticks(os.getpid())
        profilers = start_profilers(system, profile, scenario.name) if profile else []
        await drive(system, scenario, run)
        infra_after, machine_after = _infra_ticks(), machine_ticks()
        bench_after = _cpu_ticks(os.getpid())
        for profiler in profilers:
            profiler.send_signal(2)  # SIGINT: py-spy writes its output and exits
            profiler.wait(30)
        for pname, proc in system.processes.items():
            assert proc.process is not None
            pid = proc.process.pid
            run.processes[pname].rss_peak_kb = _status_kb(pid, "VmHWM")
            run.processes[pname].cpu_ticks_after = _cpu_ticks(pid)
        result = summarise(run, reference)
        for pname, before in infra_before.items():
            result["processes"][pname] = _cpu_only(infra_after[pname] - before, scenario.jobs)
        result["processes"]["bench (clients)"] = _cpu_only(
            bench_after - bench_before, scenario.jobs
        )
        result["orchestrator"] = await orchestrator_figures(system, scenario.jobs)
        result["machine_busy_pct"] = busy_pct(machine_before, machine_after)
        return result


def print_table(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'scenario':<10}{'jobs':>6}{'lost':>5}{'fail':>5}{'acc/s':>8}{'done/s':>8}"
        f"{'pick p50':>9}{'p95':>7}{'p99':>7}{'done p50':>9}{'p95':>8}{'p99':>8}{'ratio':>8}"
    )
    print(header)
    for r in results:
        s, p, c = r["scenario"], r["pickup_ms"], r["completion_ms"]
        print(
            f"{s['name']:<10}{r['submitted']:>6}{r['lost']:>5}{r['failed']:>5}"
            f"{r['accepted_jobs_per_s']:>8}{r['completed_jobs_per_s']:>8}"
            f"{p[50]:>9}{p[95]:>7}{p[99]:>7}{c[50]:>9}{c[95]:>8}{c[99]:>8}"
            f"{r['completed_per_reference']:>8}"
        )
    print()
    print(f"{'process':<14}{'idle MB':>9}{'peak MB':>9}{'CPU ms/job':>12}   (per scenario)")
    for r in results:
        o = r.get("orchestrator", {})
        print(
            f"-- {r['scenario']['name']} (reference {r['reference_msgs_per_s']:.0f} msg/s; "
            f"orchestrator: {o.get('messages_per_transaction')} messages per transaction; "
            f"machine {r.get('machine_busy_pct')}% busy; {r.get('post_retries', 0)} POSTs "
            f"retried, {r.get('ws_reconnects', 0)} WebSockets reopened)"
        )
        print(
            f"   append to commit {o.get('append_commit_ms_per_append')} ms per append, "
            f"{o.get('append_commit_ms_per_job')} ms per job"
        )
        for name, proc in r["processes"].items():
            print(
                f"{name:<14}{proc['rss_idle_mb'] or '':>9}{proc['rss_peak_mb'] or '':>9}"
                f"{proc['cpu_ms_per_job']:>12}"
            )


SCENARIOS = {
    "idle": Scenario(
        "idle",
        jobs=50,
        model_latency_ms=0,
        max_concurrent_jobs=10,
        clients=1,
        users=1,
        sequential=True,
    ),
    "0ms": Scenario("0ms", jobs=1000, model_latency_ms=0, max_concurrent_jobs=100),
    "1000ms": Scenario("1000ms", jobs=1000, model_latency_ms=1000, max_concurrent_jobs=100),
    # The same as 0ms without streaming: no progress event per object.
    "0ms-nostream": Scenario(
        "0ms-nostream", jobs=1000, model_latency_ms=0, max_concurrent_jobs=100, stream=False
    ),
    # A real model's reply, 10 s a call: the first token after 1 s, then the stand-in's
    # replies to these prompts (91 chunks on average) 100 ms apart; 1,000 at once on one
    # generator process, a bound of about 100 jobs/s. (Until 2026-12-07 the chunks were
    # 140 ms apart, meant for 64 a reply: a 13.8 s model, a bound of about 72 jobs/s.)
    "10s": Scenario(
        "10s",
        jobs=3000,
        model_latency_ms=1000,
        chunk_delay_ms=100,
        max_concurrent_jobs=1000,
        clients=64,
        users=16,
    ),
}


# Scenarios of their own shape (not the SCENARIOS table's), run by "all" after it.
EXTRA = ("history", "orchestrators", "fair", "budget")


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        choices=[*SCENARIOS, *EXTRA, "all"],
        default="all",
    )
    parser.add_argument("--jobs", type=int, help="override the number of jobs")
    parser.add_argument(
        "--queue-type",
        choices=["quorum", "classic"],
        default="quorum",
        help="AMQP_QUEUE_TYPE of the services' shared queues (default quorum)",
    )
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated services to sample with py-spy (e.g. orchestrator,generator)",
    )
    args = parser.parse_args(argv)
    names = [*SCENARIOS, *EXTRA] if args.scenario == "all" else [args.scenario]
    results = []
    history: dict[str, Any] | None = None
    fleet: list[dict[str, Any]] = []
    sharing: dict[str, dict[str, Any] | None] = {"fair": None, "budget": None}
    with tempfile.TemporaryDirectory(prefix="canvas-bench-") as tmp:
        for name in names:
            if name == "history":
                print("bench: running history (100,000 past jobs)...", file=sys.stderr, flush=True)
                history = await run_history(Path(tmp))
                continue
            if name in sharing:
                print(f"bench: running {name} (issue 16's scale)...", file=sys.stderr, flush=True)
                run = run_fair if name == "fair" else run_budget
                sharing[name] = await run(Path(tmp))
                continue
            if name == "orchestrators":
                print(
                    "bench: running orchestrators (four processes)...", file=sys.stderr, flush=True
                )
                # Busy (large group commits), then small transactions whose commit is 5 ms
                # away: where taking turns on one lock would cap a fleet.
                fleet = [await run_fleet(), await run_fleet(in_flight=4, commit_rtt_ms=5)]
                continue
            scenario = SCENARIOS[name]
            if args.jobs and name != "idle":
                scenario.jobs = args.jobs
            print(
                f"bench: running {name} ({scenario.jobs} jobs, {args.queue_type} queues)...",
                file=sys.stderr,
                flush=True,
            )
            profile = [name for name in args.profile.split(",") if name]
            try:
                results.append(await run_scenario(scenario, Path(tmp), profile, args.queue_type))
            except Exception:
                # The services' logs say why; the temporary directory goes with the run.
                kept = RESULTS / f"logs-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.copytree(tmp, kept)
                print(f"bench: {name} failed; the services' logs are in {kept}", file=sys.stderr)
                raise
    if results:
        print_table(results)
    if history is not None:
        print_history(history)
    print_sharing(sharing["fair"], sharing["budget"])
    for result in results:
        for error in result["errors"]:
            print(f"bench: {result['scenario']['name']}: job ended {error}", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"e2e-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "queue_type": args.queue_type,
    }
    document = {
        "meta": meta,
        "results": results,
        "history": history,
        "orchestrators": fleet,
        **sharing,
    }
    out.write_text(json.dumps(document, indent=2))
    print(f"\nbench: results in {out}", file=sys.stderr)
    lost = sum(r["lost"] + r["failed"] for r in results)
    return 1 if lost or not all(run["ok"] for run in fleet) else 0


if __name__ == "__main__":
    import uvloop

    # uvloop, as the services run: the clients share the two cores with what they measure,
    # and every millisecond of theirs is one the system does not get.
    raise SystemExit(uvloop.run(main(sys.argv[1:])))
