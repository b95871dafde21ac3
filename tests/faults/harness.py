"""What every fault test does around its fault: submit jobs over the gateway, wait for
them through the gateway's status API, and check the outcome the way a user would
(each job final, its objects on its canvas exactly once) and the way an operator would
(the canvas_objects rows in the database, the job's event history, the logs)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import httpx
import websockets

from canvas_events.topology import Topology
from tests.support.env import admin_connection
from tests.support.processes import ServiceProcess
from tests.support.system import JWT_SECRET, OPENAI_KEY, System
from tests.support.users import Submitted as Submitted  # re-exported for the tests
from tests.support.users import User
from tests.support.waiting import eventually as eventually  # re-exported for the tests

FINAL = frozenset({"completed", "failed", "cancelled"})
RESULT_TYPES = frozenset({"GenerationSucceeded", "GenerationFailed"})

T = TypeVar("T")


def query(index: int, *, delay_ms: int = 0, extra: str = "") -> str:
    """A prompt for job ``index``; ``delay_ms`` makes the stand-in model answer that late,
    so that the attempt is genuinely in flight when the fault hits."""
    directives = [f"delay_ms={delay_ms}"] if delay_ms else []
    if extra:
        directives.append(extra)
    suffix = f" [[fake:{','.join(directives)}]]" if directives else ""
    return f"fault test job {index}: a flowchart from start to finish{suffix}"


class Client(User):
    """One user of a running system (tests/support/users.py), with what fault tests ask
    of the gateway besides: many jobs at once, and their statuses through any outage."""

    def __init__(
        self, system: System, user: str = "fault-user", *, gateway: str = "gateway"
    ) -> None:
        super().__init__(system, user, gateway=gateway)

    async def submit_many(self, queries: Sequence[str], *, concurrency: int = 8) -> list[Submitted]:
        """Submit each query (each job on a canvas of its own); every one must get a 202."""
        gate = asyncio.Semaphore(concurrency)

        async def one(text: str) -> Submitted:
            async with gate:
                return await self.submit(text)

        return list(await asyncio.gather(*(one(text) for text in queries)))

    async def statuses(self) -> dict[str, dict[str, Any]] | None:
        """Every job of this user by id (the gateway's list, page by page), or None while
        the gateway cannot answer (its database or broker away)."""
        jobs: dict[str, dict[str, Any]] = {}
        cursor: str | None = None
        try:
            while True:
                params: dict[str, str | int] = {"limit": 100}
                if cursor is not None:
                    params["cursor"] = cursor
                answer = await self.http.get("/api/ai-agent/jobs", params=params)
                if answer.status_code != 200:
                    return None
                body = answer.json()
                jobs.update({job["id"]: job for job in body["jobs"]})
                cursor = body["next_cursor"]
                if cursor is None:
                    return jobs
        except httpx.TransportError:
            return None

    async def wait_until(
        self,
        predicate: Callable[[dict[str, dict[str, Any]]], bool],
        *,
        timeout: float,
        what: str,
    ) -> dict[str, dict[str, Any]]:
        """Poll the list until ``predicate(statuses)`` holds."""

        async def check() -> dict[str, dict[str, Any]] | None:
            jobs = await self.statuses()
            return jobs if jobs is not None and predicate(jobs) else None

        return await eventually(check, timeout=timeout, what=what, interval=0.2)

    async def wait_final(
        self, submitted: Iterable[Submitted], *, timeout: float
    ) -> dict[str, dict[str, Any]]:
        """The statuses once every job in ``submitted`` is final, or the last ones seen
        when ``timeout`` runs out (the jobs not final by then count as lost)."""
        ids = {job.job_id for job in submitted}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: dict[str, dict[str, Any]] = {}
        while True:
            jobs = await self.statuses()
            if jobs is not None:
                last = jobs
                if all(jobs.get(job_id, {}).get("status") in FINAL for job_id in ids):
                    return jobs
            if loop.time() > deadline:
                return last
            await asyncio.sleep(0.2)

    async def outcome(self, submitted: Sequence[Submitted], *, timeout: float) -> Outcome:
        """What became of ``submitted`` (:func:`check_outcome`) once every job is final,
        or ``timeout`` ran out (:meth:`wait_final`)."""
        statuses = await self.wait_final(submitted, timeout=timeout)
        return await check_outcome(self, submitted, statuses)


def count_status(jobs: dict[str, dict[str, Any]], status: str = "completed") -> int:
    """How many jobs are in ``status``."""
    return sum(1 for job in jobs.values() if job["status"] == status)


@dataclass
class Outcome:
    """What became of the submitted jobs, and every problem found with them."""

    submitted: int
    # The job list the outcome was read from: {job id: status answer}.
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    lost: int = 0
    duplicated_objects: int = 0
    missing_objects: int = 0
    retries: int = 0
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


async def check_outcome(
    client: Client, submitted: Sequence[Submitted], statuses: dict[str, dict[str, Any]]
) -> Outcome:
    """Each job final in ``statuses`` (else lost); each completed job's
    result.object_ids on its canvas exactly once, through the API and in the
    canvas_objects rows; each job's attempts one after another in its history."""
    outcome = Outcome(submitted=len(submitted), statuses=statuses)
    rows = await _object_rows(client.system.database_url)
    for job in submitted:
        status = statuses.get(job.job_id)
        state = status["status"] if status else "missing"
        if state not in FINAL:
            outcome.lost += 1
            outcome.problems.append(f"job {job.job_id} lost: {state} at the deadline")
            continue
        # The job's own status answer must agree with the list that was polled.
        status = await client.status(job.job_id)
        if status["status"] != state:
            outcome.problems.append(f"job {job.job_id}: status {status['status']}, listed {state}")
        events = await client.events(job.job_id)
        outcome.events[job.job_id] = events
        outcome.retries += sum(1 for event in events if event["type"] == "JobRetryScheduled")
        outcome.problems += [f"job {job.job_id}: {p}" for p in attempt_problems(events)]
        if state != "completed":
            outcome.failed += state == "failed"
            outcome.cancelled += state == "cancelled"
            if rows.get(job.job_id):
                outcome.problems.append(f"job {job.job_id} {state} but has objects")
            continue
        outcome.completed += 1
        result = status["result"]
        expected = list(result["object_ids"])
        drawn = [item["id"] for item in await client.objects(job.canvas_id)]
        total, distinct = rows.get(job.job_id, (0, 0))
        # Objects beyond one per id: repeated ids through the API, extra rows in the table.
        duplicated = (len(drawn) - len(set(drawn))) + max(0, total - result["object_count"])
        outcome.duplicated_objects += duplicated
        missing = len(set(expected) - set(drawn))
        outcome.missing_objects += missing
        if duplicated or missing or set(drawn) != set(expected):
            outcome.problems.append(
                f"job {job.job_id}: canvas has {sorted(drawn)}, result says {sorted(expected)}"
            )
        if total != result["object_count"] or distinct != total:
            outcome.problems.append(
                f"job {job.job_id}: {total} canvas_objects rows ({distinct} distinct), "
                f"object_count {result['object_count']}"
            )
        if len(expected) != result["object_count"]:
            outcome.problems.append(f"job {job.job_id}: object_ids and object_count disagree")
    return outcome


def assert_completed(outcome: Outcome, jobs: int) -> None:
    """Every one of the ``jobs`` submitted completed, none lost, no object on a canvas
    twice, and nothing else wrong with them (:func:`check_outcome`)."""
    assert outcome.completed == jobs, outcome.problems
    assert outcome.lost == 0 and outcome.duplicated_objects == 0
    assert outcome.problems == []


async def _object_rows(database_url: str) -> dict[str, tuple[int, int]]:
    """{job id: (canvas_objects rows, distinct object ids)} straight from the database."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT job_id::text AS job_id, count(*) AS total, count(DISTINCT id) AS distinct_ids "
            "FROM canvas_objects GROUP BY job_id"
        )
    finally:
        await conn.close()
    return {row["job_id"]: (row["total"], row["distinct_ids"]) for row in rows}


def attempt_problems(events: Sequence[dict[str, Any]]) -> list[str]:
    """What breaks "one attempt at a time" in a job's history: each GenerationRequested
    numbers its attempt one above the last; a new attempt is requested only after the
    previous one has its result; each run of an attempt starts at most once (a second
    run is recorded only when it takes the attempt over, see :func:`run_problems`), and
    an attempt has at most one result; results belong to an attempt that was requested."""
    problems = []
    requested: dict[str, int] = {}
    started: Counter[tuple[str, str | None]] = Counter()
    results: Counter[str] = Counter()
    current: str | None = None
    for event in events:
        kind, data = event["type"], event["data"]
        attempt_id = data.get("attempt_id")
        if kind == "GenerationRequested":
            number = int(data["attempt"])
            if number != len(requested) + 1:
                problems.append(f"attempt {number} requested after {len(requested)} attempts")
            if current is not None and results[current] == 0:
                problems.append(f"attempt {number} requested while {current} had no result")
            requested[attempt_id] = number
            current = attempt_id
        elif kind == "GenerationStarted":
            started[(attempt_id, data.get("run_id"))] += 1
        elif kind in RESULT_TYPES:
            results[attempt_id] += 1
    for (attempt_id, run_id), count in started.items():
        if count > 1:
            problems.append(f"run {run_id} of attempt {attempt_id} started {count} times")
    for attempt_id, count in results.items():
        if count > 1:
            problems.append(f"attempt {attempt_id} has {count} results")
        if attempt_id not in requested:
            problems.append(f"result of an attempt never requested: {attempt_id}")
    return problems


def run_problems(events: Sequence[dict[str, Any]]) -> list[str]:
    """What breaks "only an attempt's newest run counts" in a job's history: every
    GenerationStarted, GenerationProgressed and result a generator sent names its run
    (``run_id``), and each progress or result belongs to the newest run of its attempt
    started so far. (A GenerationFailed for an expired lease is the orchestrator's own,
    of no run.)"""
    problems = []
    newest: dict[str, str] = {}
    for event in events:
        kind, data = event["type"], event["data"]
        if kind not in {"GenerationStarted", "GenerationProgressed", *RESULT_TYPES}:
            continue
        if data.get("kind") == "lease_expired":
            continue
        attempt_id, run_id = data.get("attempt_id"), data.get("run_id")
        if not run_id:
            problems.append(f"{kind} of attempt {attempt_id} names no run")
        elif kind == "GenerationStarted":
            newest[attempt_id] = run_id
        elif newest.setdefault(attempt_id, run_id) != run_id:
            problems.append(
                f"{kind} of run {run_id} recorded after run {newest[attempt_id]} took over"
            )
    return problems


def figures(scenario: str, outcome: Outcome, *, faults: int, **extra: object) -> str:
    """The one line of figures a fault test prints (run pytest with -s to see it)."""
    parts = [
        f"submitted={outcome.submitted}",
        f"faults={faults}",
        f"completed={outcome.completed}",
        f"lost={outcome.lost}",
        f"duplicated_objects={outcome.duplicated_objects}",
        f"retries={outcome.retries}",
        *(f"{name}={value}" for name, value in extra.items()),
    ]
    line = f"fault {scenario}: {' '.join(parts)}"
    print(line, flush=True)
    return line


def calls_of(calls: dict[str, int], text: str) -> int:
    """The model calls whose prompt was ``text`` (a :func:`query`), in the stand-in's
    ``calls()``."""
    # The generator sends the query as the user message, cleaned of surrounding space.
    return calls.get(text.strip(), 0)


async def set_read_only(database_url: str, read_only: bool) -> None:
    """Make new sessions of the database read-only (or not), and end every session it
    has now, as a failover does."""
    name = urlsplit(database_url).path.lstrip("/")
    setting = "on" if read_only else "off"
    async with admin_connection(database_url, timeout=10) as admin:
        await admin.execute(
            f'ALTER DATABASE "{name}" SET default_transaction_read_only = {setting}'
        )
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )


async def dead_letters(system: System) -> dict[str, int]:
    """Messages waiting in each of the system's dead-letter queues."""
    connection = await aio_pika.connect(system.amqp_url)
    counts: dict[str, int] = {}
    async with connection:
        for name in Topology(system.prefix).dead_letter_queues:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                counts[name] = 0  # never declared: nothing was dead-lettered there
                continue
            counts[name] = queue.declaration_result.message_count or 0
            await channel.close()
    return counts


async def wait_in_flight(system: System, *, at_least: int, timeout: float = 20) -> int:
    """Wait until the stand-in model serves ``at_least`` calls at once; how many it does."""

    def check() -> int | None:
        in_flight = int(system.stand_in.stats()["in_flight"])
        return in_flight if in_flight >= at_least else None

    return await eventually(check, timeout=timeout, what=f"{at_least} model calls in flight")


async def wait_ready(processes: Iterable[ServiceProcess], *, timeout: float = 60) -> None:
    """Every process answers /ready with 200 again."""
    await asyncio.gather(*(process.wait_ready(timeout) for process in processes))


async def restart_mid_run(
    system: System,
    scenario: str,
    restart: Callable[[], Awaitable[object]],
    recovering: Iterable[ServiceProcess],
    *,
    jobs: int = 20,
    more: int = 3,
    then: Callable[[], Awaitable[dict[str, object]]] | None = None,
) -> None:
    """A server of ``system`` restarted while it is busy, and nothing lost.

    ``jobs`` jobs of a second each are submitted; once three completed (others in
    flight, the rest queued), ``restart()`` runs (it returns with the server up again).
    Then the ``recovering`` services must be ready again and ``then()`` pass (it
    returns figures of its own), and ``more`` new jobs go through too. Every job
    completes with its objects on its canvas once, and a WebSocket client that
    reconnects with ``after=`` sees every completion, each frame once and in order.
    The figures line is ``scenario``'s."""
    async with Client(system) as client, Watcher(system) as watcher:
        submitted = await client.submit_many([query(i, delay_ms=1000) for i in range(jobs)])
        await client.wait_until(
            lambda statuses: count_status(statuses) >= 3,
            timeout=30,
            what="the first jobs to complete",
        )
        down = time.monotonic()
        await restart()
        up = time.monotonic()
        await wait_ready(recovering, timeout=60)
        ready = time.monotonic()
        extra = await then() if then is not None else {}
        submitted += await client.submit_many([query(jobs + i) for i in range(more)])
        outcome = await client.outcome(submitted, timeout=45)
        await watcher.wait_completed({job.job_id for job in submitted}, timeout=20)

    figures(
        scenario,
        outcome,
        faults=1,
        ws_reconnects=watcher.connects - 1,
        down_s=round(up - down, 1),
        ready_again_s=round(ready - down, 1),
        **extra,
    )
    assert_completed(outcome, jobs + more)
    assert watcher.problems() == []
    assert log_problems(system) == []


def lines(process: ServiceProcess, event: str) -> list[dict[str, Any]]:
    """The log lines of ``process`` whose ``event`` is ``event``."""
    return [line for line in process.log_lines() if line.get("event") == event]


@dataclass(frozen=True)
class Run:
    """One generator process working one attempt: from its "attempt started" line to the
    line that ends the attempt there, or to the kill -9 that cut it off."""

    process: str
    attempt_id: str
    started: datetime
    ended: datetime


# The worker logs one of these when an attempt it started is over (before publishing
# the result, which is what the next run of the attempt could race with at worst).
_RUN_ENDS = frozenset({"objects parsed", "attempt failed", "attempt cancelled"})


def attempt_runs(
    generators: Sequence[ServiceProcess], killed_at: dict[str, list[datetime]]
) -> dict[str, list[Run]]:
    """Every run of every attempt in the generators' logs, by attempt id. A run cut off
    by a kill -9 ends at the kill; one that never ended runs until now."""
    runs: dict[str, list[Run]] = defaultdict(list)
    for process in generators:
        for run in _runs_of(process, sorted(killed_at.get(process.name, []))):
            runs[run.attempt_id].append(run)
    return runs


def _runs_of(process: ServiceProcess, kills: list[datetime]) -> list[Run]:
    runs: list[Run] = []
    running: dict[str, list[datetime]] = defaultdict(list)

    def cut(at: datetime) -> None:
        for attempt_id, starts in running.items():
            runs.extend(Run(process.name, attempt_id, start, at) for start in starts)
        running.clear()

    for line in process.log_lines():
        at = datetime.fromisoformat(line["timestamp"])
        while kills and kills[0] <= at:
            cut(kills.pop(0))  # later lines come from the restarted process
        attempt_id = line.get("attempt_id")
        if not attempt_id:
            continue
        if line.get("event") == "attempt started":
            running[attempt_id].append(at)
        elif line.get("event") in _RUN_ENDS and running.get(attempt_id):
            start = running[attempt_id].pop(0)
            runs.append(Run(process.name, attempt_id, start, at))
    cut(kills[0] if kills else datetime.now(UTC))
    return runs


def overlapping_runs(runs: dict[str, list[Run]]) -> list[str]:
    """Attempts that two runs worked on at the same time."""
    found = []
    for attempt_id, items in runs.items():
        ordered = sorted(items, key=lambda run: run.started)
        for before, after in itertools.pairwise(ordered):
            if after.started < before.ended:
                found.append(
                    f"attempt {attempt_id} ran on {before.process} and {after.process} at once "
                    f"({before.started.time()}..{before.ended.time()} and "
                    f"{after.started.time()}..{after.ended.time()})"
                )
    return found


async def answers_200(url: str) -> bool:
    """Whether ``url`` answers 200 to a GET."""
    with contextlib.suppress(httpx.HTTPError):
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(url)).status_code == 200
    return False


def log_problems(system: System) -> list[str]:
    """What is wrong with the logs after a fault: a line that is not JSON, or a secret
    (the JWT secret, the API key, a password in a URL) in any process's log."""
    problems = []
    secrets = (JWT_SECRET, OPENAI_KEY, ":guest@")
    for name, process in system.processes.items():
        try:
            process.log_lines()
        except AssertionError as exc:
            problems.append(f"{name}: {exc}")
        if process.log_path.exists():
            text = process.log_path.read_text(errors="replace")
            problems += [f"{name} logged a secret" for secret in secrets if secret in text]
    return problems


class Watcher:
    """A WebSocket client of the notifier that behaves as the contract asks a browser to:
    it reconnects with ``after=`` its last position whenever the connection closes, so
    it should see every status event once, in position order, whatever the fault."""

    def __init__(
        self, system: System, user: str = "fault-user", *, notifier: str = "notifier"
    ) -> None:
        self.system = system
        self.token = system.token(user)
        self.notifier = notifier
        self.frames: list[dict[str, Any]] = []
        self.connects = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        connected = asyncio.Event()
        self._task = asyncio.create_task(self._run(connected))
        await asyncio.wait_for(connected.wait(), 15)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, connected: asyncio.Event) -> None:
        while True:
            after = self.frames[-1]["position"] if self.frames else None
            try:
                url = self.system.websocket_url(self.token, after, notifier=self.notifier)
                async with websockets.connect(url) as ws:
                    self.connects += 1
                    connected.set()
                    async for raw in ws:
                        frame = json.loads(raw)
                        if "position" in frame:
                            self.frames.append(frame)
            except (OSError, websockets.exceptions.WebSocketException):
                pass  # the notifier restarted or closed us: reconnect, as a browser would
            await asyncio.sleep(0.2)

    def completed(self) -> set[str]:
        """The jobs whose ai_generation_completed frame arrived."""
        return {f["job_id"] for f in self.frames if f["type"] == "ai_generation_completed"}

    async def wait_completed(self, job_ids: set[str], *, timeout: float) -> None:
        async def check() -> bool:
            return job_ids <= self.completed()

        await eventually(check, timeout=timeout, what="every completion over the WebSocket")

    def problems(self) -> list[str]:
        """Frames out of order or seen twice."""
        positions = [frame["position"] for frame in self.frames]
        found = []
        if positions != sorted(positions):
            found.append("frames out of position order")
        if len(set(positions)) != len(positions):
            found.append(f"{len(positions) - len(set(positions))} frames seen twice")
        return found
