"""`make bench-notifier`: many WebSocket clients on one real ``canvas-notifier`` process.

Against the PostgreSQL and RabbitMQ named by ``DATABASE_URL`` / ``AMQP_URL`` (else the
local defaults), with a scratch database and a topology prefix of its own:

1. starts one ``canvas-notifier`` on a free port (its log in a temporary directory);
2. reads its RSS, opens ``--clients`` WebSocket connections spread over ``--users``
   users from ``--workers`` client processes, and reads its RSS again;
3. publishes recorded-style ``job.*`` envelopes straight onto the exchange, as the
   orchestrator's relay does (increasing positions, ``occurred_at`` = the publish
   time), ``--rate`` events a second for ``--seconds`` seconds, each user's jobs in
   turn (queued, started, progress x4, completed: every one a frame for clients);
4. waits until every expected frame is written, then prints connections held, frames
   delivered per second, publish-to-receive latency p50/p99 (each client reads
   ``occurred_at`` from its frames), the notifier's RSS per connection and its CPU,
   and writes it all as JSON under ``bench/results/``;
5. stops everything and removes the database, the exchange and the queues.

    .venv/bin/python -m bench.notifier
    .venv/bin/python -m bench.notifier --clients 1000 --users 1000 --rate 500 --seconds 10

A client is a small asyncio protocol (handshake, unmasked server frames, pongs) rather
than the ``websockets`` client, whose per-frame cost for 5,000 connections would compete
with the notifier for this machine's two cores. Every client also checks that the
positions it receives increase.

The figures are the machine's as much as the notifier's: the report gives the load
average and how long the notifier waited for a CPU (other processes running), to read
a slow run by. This is a benchmark, not a test: it prints and records, never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aio_pika
import asyncpg
import httpx
import orjson

from canvas_events.auth import mint_token
from canvas_events.events import (
    Event,
    GenerationProgressed,
    GenerationStarted,
    JobCompleted,
    JobQueued,
)
from canvas_events.topology import JOB, Topology, routing_key
from tests.conftest import delete_topology
from tests.support.env import amqp_url, database_url
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
MIGRATIONS = ROOT / "libs/store/src/canvas_store/migrations"
RESULTS = ROOT / "bench/results"
BIN = Path(sys.executable).parent

# The targets on this machine (2 cores).
TARGET_CONNECTIONS = 5_000
TARGET_RATE = 1_000
TARGET_P99_MS = 100.0
TARGET_BYTES_PER_CONNECTION = 50 * 1024

# Handshakes in flight per client process: the notifier listens with asyncio's default
# backlog of 100; SYNs beyond it are dropped and retried a second later.
CONNECT_CONCURRENCY = 64
# The publisher wakes this often and sends every event that is due by then (an absolute
# schedule: the rate does not drift with the time publishing takes).
TICK_SECONDS = 0.005
# After publishing: how long the count of frames written may stay still before the
# drain is over (frames lost for good never come).
DRAIN_STILL_SECONDS = 3.0


# -- the client processes ----------------------------------------------------------------


@dataclass
class Stats:
    """What one client process saw."""

    received: int = 0
    out_of_order: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds
    arrivals: list[float] = field(default_factory=list)  # time.time() of each frame
    close_codes: dict[int, int] = field(default_factory=dict)


class BenchClient(asyncio.Protocol):
    """One WebSocket connection that records each frame's publish-to-receive latency."""

    def __init__(self, request: bytes, stats: Stats, opened: asyncio.Future[None]) -> None:
        self._request = request
        self._stats = stats
        self._opened = opened
        self._buffer = bytearray()
        self._upgraded = False
        self._last_position = 0
        self.transport: asyncio.Transport | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self._opened.done():
            self._opened.set_exception(exc or ConnectionError("closed during the handshake"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded and not self._handshake():
            return
        # One clock reading per read: frames that arrive together arrived together.
        now = time.time()
        offset, size = 0, len(buffer)
        while size - offset >= 2:
            first, second = buffer[offset], buffer[offset + 1]
            length, header = second & 0x7F, 2
            if length == 126:
                if size - offset < 4:
                    break
                length, header = int.from_bytes(buffer[offset + 2 : offset + 4], "big"), 4
            elif length == 127:
                if size - offset < 10:
                    break
                length, header = int.from_bytes(buffer[offset + 2 : offset + 10], "big"), 10
            if size - offset < header + length:
                break
            # Server frames are never masked, and the notifier never fragments.
            payload = bytes(buffer[offset + header : offset + header + length])
            offset += header + length
            opcode = first & 0x0F
            if opcode == 0x1:
                self._text(payload, now)
            elif opcode == 0x9:
                self._write(0xA, payload)  # pong
            elif opcode == 0x8:
                self._closed_by_server(payload)
                break
        if offset:
            del buffer[:offset]

    def _handshake(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        status = bytes(buffer[: buffer.find(b"\r\n")])
        assert self.transport is not None
        if b" 101 " not in status:
            self._opened.set_exception(ConnectionError(status.decode(errors="replace")))
            self.transport.close()
            return False
        del buffer[: end + 4]
        self._upgraded = self.open = True
        self._opened.set_result(None)
        return True

    def _text(self, payload: bytes, now: float) -> None:
        frame = orjson.loads(payload)
        position = frame.get("position")
        if position is None:
            return  # a control frame
        stats = self._stats
        stats.received += 1
        if position <= self._last_position:
            stats.out_of_order += 1
        self._last_position = position
        stats.latencies.append(now - datetime.fromisoformat(frame["occurred_at"]).timestamp())
        stats.arrivals.append(now)

    def _closed_by_server(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self._stats.close_codes[code] = self._stats.close_codes.get(code, 0) + 1
        self._write(0x8, payload[:2])
        self.open = False
        assert self.transport is not None
        self.transport.close()

    def _write(self, opcode: int, payload: bytes) -> None:
        # Client frames are masked (RFC 6455 5.3); pings and closes carry a few bytes.
        assert self.transport is not None
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)


async def _connect(
    port: int, token: str, stats: Stats, gate: asyncio.Semaphore
) -> BenchClient | None:
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    for _ in range(5):
        opened: asyncio.Future[None] = loop.create_future()
        async with gate:
            try:
                _, client = await loop.create_connection(
                    lambda opened=opened: BenchClient(request, stats, opened),  # type: ignore[misc]
                    "127.0.0.1",
                    port,
                )
                await asyncio.wait_for(opened, 30)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.5)
                continue
        return client
    return None


async def worker(args: argparse.Namespace) -> None:
    """A client process: connect, say so, hold the connections until told to stop,
    then report on stdout (one JSON line each time)."""
    _raise_open_files()
    secret = os.environ["BENCH_JWT_SECRET"]
    stats = Stats()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    tokens: dict[int, str] = {}
    connecting = []
    for index in range(args.first, args.first + args.count):
        user = index % args.users
        if user not in tokens:
            tokens[user] = mint_token(_user(user), secret)
        connecting.append(_connect(args.port, tokens[user], stats, gate))
    clients = [client for client in await asyncio.gather(*connecting) if client is not None]
    _say({"connected": len(clients)})

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "go": publishing starts
    cpu_start = time.process_time()
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop", or EOF
    cpu = time.process_time() - cpu_start
    held = sum(client.open for client in clients)
    for client in clients:
        if client.transport is not None:
            client.transport.abort()
    _say(
        {
            "held": held,
            "received": stats.received,
            "out_of_order": stats.out_of_order,
            "close_codes": stats.close_codes,
            "latencies": stats.latencies,
            "arrivals": stats.arrivals,
            "cpu_seconds": cpu,
        }
    )


def _say(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.buffer.flush()


def _user(index: int) -> str:
    return f"bench-user-{index}"


# -- the publisher -----------------------------------------------------------------------


def _job_cycle() -> list[Event]:
    attempt = uuid.uuid4()
    box = {"type": "rectangle", "x": 10, "y": 20, "width": 120, "height": 60, "text": "Login"}
    return [
        JobQueued(priority=5, retry_count=0),
        GenerationStarted(attempt_id=attempt, model="bench-model", generator_id="bench"),
        *(GenerationProgressed(attempt_id=attempt, index=i, object=box) for i in range(4)),
        JobCompleted(
            object_count=4,
            object_ids=[f"obj-{i}" for i in range(4)],
            dropped_objects=0,
            model="bench-model",
            usage={"prompt_tokens": 120, "completion_tokens": 240, "total_tokens": 360},
            latency_ms=850,
        ),
    ]


class Events:
    """Recorded-style envelopes for every user's jobs in turn, one event at a time."""

    def __init__(self, users: int) -> None:
        self._users = users
        # (type, schema version, data) rendered once: the publisher must stay cheap.
        self._cycle = [
            (event.type_name(), event.SCHEMA_VERSION, event.model_dump(mode="json"))
            for event in _job_cycle()
        ]
        self._step = [0] * users
        self._job = [str(uuid.uuid4()) for _ in range(users)]
        self.position = 0
        self.per_user = [0] * users

    def next(self) -> tuple[str, bytes]:
        """The routing key and body of the next event; ``occurred_at`` is now."""
        self.position += 1
        user = (self.position - 1) % self._users
        step = self._step[user]
        if step == 0:
            self._job[user] = str(uuid.uuid4())
        kind, version, data = self._cycle[step]
        self._step[user] = (step + 1) % len(self._cycle)
        self.per_user[user] += 1
        job_id = self._job[user]
        body = {
            "event_id": str(uuid.uuid4()),
            "type": kind,
            "schema_version": version,
            "occurred_at": datetime.now(UTC).isoformat(),
            "correlation_id": f"bench-{job_id}",
            "causation_id": None,
            "job_id": job_id,
            "user_id": _user(user),
            "canvas_id": f"bench-canvas-{user}",
            "position": self.position,
            "data": data,
        }
        return routing_key(JOB, kind), orjson.dumps(body)


async def publish(
    exchange: aio_pika.abc.AbstractExchange, events: Events, rate: int, seconds: float
) -> float:
    """Publish ``rate`` events a second for ``seconds``; the time it really took."""
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    start = loop.time()
    sent = 0
    while sent < total:
        due = min(total, int((loop.time() - start) * rate) + 1)
        while sent < due:
            key, body = events.next()
            await exchange.publish(aio_pika.Message(body, content_type="application/json"), key)
            sent += 1
        await asyncio.sleep(TICK_SECONDS)
    return loop.time() - start


# -- measuring a process -----------------------------------------------------------------


def _raise_open_files() -> None:
    # Every client is a socket, and so is every connection the notifier holds (it
    # inherits this limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _cpu_seconds(pid: int) -> float:
    # utime and stime: fields 14 and 15 of /proc/PID/stat, counted after the "(comm)".
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _waiting_seconds(pid: int) -> float:
    # /proc/PID/schedstat: ns on a CPU, ns runnable but waiting for one, time slices.
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


async def _sample(pid: int, samples: list[tuple[float, float]]) -> None:
    """Append (CPU, waiting for a CPU) of ``pid`` over each second, until cancelled."""
    cpu, waiting = _cpu_seconds(pid), _waiting_seconds(pid)
    while True:
        await asyncio.sleep(1.0)
        now_cpu, now_waiting = _cpu_seconds(pid), _waiting_seconds(pid)
        samples.append((now_cpu - cpu, now_waiting - waiting))
        cpu, waiting = now_cpu, now_waiting


async def _metric(http: httpx.AsyncClient, name: str) -> float:
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# -- the run -----------------------------------------------------------------------------


class Bench:
    """One run: scratch database and topology, the notifier, the client processes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.database = f"cj_bench_{uuid.uuid4().hex[:12]}"
        self.database_url = database_url(self.database)
        self.amqp_url = amqp_url()
        self.topology = Topology(prefix=f"bench{uuid.uuid4().hex[:10]}")
        self.secret = secrets.token_urlsafe(48)
        self.port = free_port()
        self.log_dir = Path(tempfile.mkdtemp(prefix="bench-notifier-"))
        self.notifier: asyncio.subprocess.Process | None = None
        self.workers: list[asyncio.subprocess.Process] = []
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    async def run(self) -> dict[str, Any]:
        """Every phase; whatever happens, everything is removed afterwards."""
        _raise_open_files()
        await self._create_database()
        try:
            return await self._measure()
        finally:
            await self._clean_up()

    async def _measure(self) -> dict[str, Any]:
        args = self.args
        notifier = await self._start_notifier()
        rss_before = _rss_bytes(notifier.pid)

        started = time.monotonic()
        connected = await self._connect_clients()
        connect_seconds = time.monotonic() - started
        # Every handler past its first query before the RSS is read.
        deadline = time.monotonic() + 60
        while await _metric(self.http, "canvas_websocket_connections") < connected:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        rss_connected = _rss_bytes(notifier.pid)
        print(
            f"{connected} connections in {connect_seconds:.1f} s; "
            f"publishing {args.rate}/s for {args.seconds:g} s",
            flush=True,
        )

        events = Events(args.users)
        sent_before = await _metric(self.http, "canvas_websocket_messages_sent_total")
        cpu_before, waiting_before = _cpu_seconds(notifier.pid), _waiting_seconds(notifier.pid)
        own_cpu_before = time.process_time()
        await self._tell_workers(b"go\n")
        samples: list[tuple[float, float]] = []
        sampling = asyncio.create_task(_sample(notifier.pid, samples))
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=False)
            exchange = await channel.get_exchange(self.topology.exchange)
            published_for = await publish(exchange, events, args.rate, args.seconds)
        sampling.cancel()
        cpu = _cpu_seconds(notifier.pid) - cpu_before
        waiting = _waiting_seconds(notifier.pid) - waiting_before
        own_cpu = time.process_time() - own_cpu_before
        load = os.getloadavg()[0]

        clients_of_user = [0] * args.users
        for index in range(args.clients):
            clients_of_user[index % args.users] += 1
        expected = sum(n * c for n, c in zip(events.per_user, clients_of_user, strict=True))
        await self._drain(sent_before, expected)
        rss_after = _rss_bytes(notifier.pid)
        held_by_server = await _metric(self.http, "canvas_websocket_connections")
        reports = await self._stop_workers()

        latencies = [1000 * value for r in reports for value in r["latencies"]]
        arrivals = [value for r in reports for value in r["arrivals"]]
        received = sum(r["received"] for r in reports)
        close_codes: dict[str, int] = {}
        for report in reports:
            for code, count in report["close_codes"].items():
                close_codes[code] = close_codes.get(code, 0) + count
        by_second: dict[int, list[float]] = {}
        origin = min(arrivals, default=0.0)
        for arrived, latency in zip(arrivals, latencies, strict=True):
            by_second.setdefault(int(arrived - origin), []).append(latency)
        return {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "parameters": {
                "clients": args.clients,
                "users": args.users,
                "rate": args.rate,
                "seconds": args.seconds,
                "workers": args.workers,
                "log_level": args.log_level,
            },
            "connections": {
                "requested": args.clients,
                "opened": connected,
                "held_at_end": sum(r["held"] for r in reports),
                "held_by_server": int(held_by_server),
                "connect_seconds": round(connect_seconds, 2),
                "closed_by_server": close_codes,
            },
            "events": {
                "published": events.position,
                "publish_seconds": round(published_for, 2),
                "frames_expected": expected,
                "frames_received": received,
                "frames_lost": expected - received,
                "out_of_order": sum(r["out_of_order"] for r in reports),
                "delivered_per_second": round(received / published_for, 1),
            },
            "latency_ms": {
                "p50": round(_percentile(latencies, 0.50), 2),
                "p90": round(_percentile(latencies, 0.90), 2),
                "p99": round(_percentile(latencies, 0.99), 2),
                "max": round(max(latencies, default=float("nan")), 2),
                "mean": round(statistics.fmean(latencies), 2) if latencies else None,
            },
            # Where in the run the slow frames were: a burst of load from elsewhere
            # shows as a few bad seconds, a notifier that cannot keep up as a slope.
            "p99_ms_by_second": [
                round(_percentile(by_second.get(second, []), 0.99), 1)
                for second in range(max(by_second, default=-1) + 1)
            ],
            # The notifier's CPU and wait for a CPU, second by second (shares of a core).
            "notifier_cpu_by_second": [round(cpu, 2) for cpu, _ in samples],
            "notifier_wait_by_second": [round(wait, 2) for _, wait in samples],
            "notifier": {
                "rss_before_mb": round(rss_before / 2**20, 1),
                "rss_connected_mb": round(rss_connected / 2**20, 1),
                "rss_after_mb": round(rss_after / 2**20, 1),
                "bytes_per_connection": round((rss_connected - rss_before) / max(connected, 1)),
                "bytes_per_connection_after_run": round(
                    (rss_after - rss_before) / max(connected, 1)
                ),
                "cpu_share": round(cpu / published_for, 2),
                # Runnable but not running, other processes having the CPUs: latency
                # that is the machine's, not the notifier's.
                "runqueue_wait_share": round(waiting / published_for, 2),
            },
            "clients_cpu_share": round(sum(r["cpu_seconds"] for r in reports) / published_for, 2),
            "publisher_cpu_share": round(own_cpu / published_for, 2),
            "load_average_1m": round(load, 2),
        }

    async def _create_database(self) -> None:
        admin = await asyncpg.connect(database_url("postgres"))
        try:
            await admin.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await admin.close()
        # The notifier reads the orchestrator's tables; the orchestrator is not running.
        conn = await asyncpg.connect(self.database_url)
        try:
            for migration in sorted(MIGRATIONS.glob("*.sql")):
                await conn.execute(migration.read_text())
        finally:
            await conn.close()

    async def _start_notifier(self) -> asyncio.subprocess.Process:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "AMQP_URL": self.amqp_url,
            "AMQP_TOPOLOGY_PREFIX": self.topology.prefix,
            "JWT_SECRET": self.secret,
            "NOTIFIER_PORT": str(self.port),
            "LOG_LEVEL": self.args.log_level,
            "LOG_FORMAT": "json",
        }
        command = [str(BIN / "canvas-notifier")]
        if self.args.profile:
            command = [sys.executable, "-m", "cProfile", "-o", self.args.profile]
            command += ["-m", "canvas_notifier"]
        log_path = self.log_dir / "notifier.log"
        with log_path.open("wb") as log_file:
            self.notifier = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT
            )
        print(f"notifier pid {self.notifier.pid} on port {self.port}", flush=True)
        deadline = time.monotonic() + 30
        while True:
            if self.notifier.returncode is not None:
                raise RuntimeError(f"canvas-notifier exited:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get("/ready")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"canvas-notifier not ready:\n{log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # start-up allocations settle before the baseline RSS
        return self.notifier

    async def _connect_clients(self) -> int:
        args = self.args
        share = -(-args.clients // args.workers)
        for first in range(0, args.clients, share):
            self.workers.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.notifier",
                    "worker",
                    f"--port={self.port}",
                    f"--first={first}",
                    f"--count={min(share, args.clients - first)}",
                    f"--users={args.users}",
                    cwd=ROOT,
                    env={**os.environ, "BENCH_JWT_SECRET": self.secret},
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=1 << 30,  # the last report holds every latency
                )
            )
        connected = 0
        for process in self.workers:
            assert process.stdout is not None
            connected += orjson.loads(await process.stdout.readline())["connected"]
        return connected

    async def _tell_workers(self, line: bytes) -> None:
        for process in self.workers:
            assert process.stdin is not None
            process.stdin.write(line)
            await process.stdin.drain()

    async def _drain(self, sent_before: float, expected: int) -> None:
        """Wait until every expected frame is written, or the count stays still."""
        last, still_since = -1.0, time.monotonic()
        while True:
            sent = await _metric(self.http, "canvas_websocket_messages_sent_total") - sent_before
            if sent >= expected or time.monotonic() - still_since > DRAIN_STILL_SECONDS:
                break
            if sent != last:
                last, still_since = sent, time.monotonic()
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # written is not yet read: let the clients catch up

    async def _stop_workers(self) -> list[dict[str, Any]]:
        await self._tell_workers(b"stop\n")
        reports = []
        for process in self.workers:
            assert process.stdout is not None
            reports.append(orjson.loads(await process.stdout.readline()))
            await process.wait()
        return reports

    async def _clean_up(self) -> None:
        for process in self.workers:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if self.notifier is not None and self.notifier.returncode is None:
            self.notifier.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.notifier.wait(), 30)
            except TimeoutError:
                self.notifier.kill()
                await self.notifier.wait()
        await self.http.aclose()
        await delete_topology(self.amqp_url, self.topology)
        admin = await asyncpg.connect(database_url("postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await admin.close()
        if self.args.keep_log:
            print(f"notifier log: {self.log_dir / 'notifier.log'}")
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def report(result: dict[str, Any]) -> str:
    """The figures, each against the run's own request and the issue's target."""
    parameters, connections = result["parameters"], result["connections"]
    events, latency, notifier = result["events"], result["latency_ms"], result["notifier"]
    published_rate = events["published"] / events["publish_seconds"]

    def mark(ok: bool) -> str:
        return "ok  " if ok else "MISS"

    def target(ok: bool) -> str:
        return "" if ok else " (below the issue's target)"

    return "\n".join(
        [
            f"clients {parameters['clients']} over {parameters['users']} users; "
            f"{parameters['rate']} events/s for {parameters['seconds']:g} s",
            f"{mark(connections['held_at_end'] == connections['requested'])} connections held"
            f"   {connections['held_at_end']} of {connections['requested']} (opened in "
            f"{connections['connect_seconds']} s; closed by the notifier: "
            f"{connections['closed_by_server'] or 'none'})"
            f"{target(connections['held_at_end'] >= TARGET_CONNECTIONS)}",
            f"{mark(published_rate >= 0.98 * parameters['rate'])} events published  "
            f"{events['published']} in {events['publish_seconds']} s ({published_rate:.0f}/s)"
            f"{target(published_rate >= 0.98 * TARGET_RATE)}",
            f"{mark(events['frames_lost'] == 0 and events['out_of_order'] == 0)} "
            f"frames delivered  {events['frames_received']} of {events['frames_expected']}, "
            f"{events['delivered_per_second']:.0f}/s (lost {events['frames_lost']}, "
            f"out of order {events['out_of_order']})",
            f"{mark(latency['p99'] < TARGET_P99_MS)} latency           p50 {latency['p50']} ms, "
            f"p90 {latency['p90']} ms, p99 {latency['p99']} ms, max {latency['max']} ms "
            f"(target p99 < {TARGET_P99_MS:g} ms)",
            f"{mark(notifier['bytes_per_connection'] < TARGET_BYTES_PER_CONNECTION)} memory"
            f"            {notifier['bytes_per_connection'] / 1024:.1f} KiB per connection "
            f"(RSS {notifier['rss_before_mb']} -> {notifier['rss_connected_mb']} MiB; "
            f"{notifier['bytes_per_connection_after_run'] / 1024:.1f} KiB after the run; "
            f"target < {TARGET_BYTES_PER_CONNECTION // 1024} KiB)",
            f"     notifier CPU      {notifier['cpu_share']:.0%} of a core, waiting for one "
            f"{notifier['runqueue_wait_share']:.0%} of the time (load average "
            f"{result['load_average_1m']}; clients {result['clients_cpu_share']:.0%}, "
            f"publisher {result['publisher_cpu_share']:.0%})",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.notifier", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--clients", type=int, default=5_000, help="WebSocket connections")
    parser.add_argument("--users", type=int, default=1_000, help="users they belong to")
    parser.add_argument("--rate", type=int, default=1_000, help="events published a second")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to publish")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--log-level", default="INFO", help="the notifier's LOG_LEVEL")
    parser.add_argument("--profile", help="run the notifier under cProfile, stats to this file")
    parser.add_argument("--keep-log", action="store_true", help="keep the notifier's log")
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("worker", help="internal: one client process")
    child.add_argument("--port", type=int, required=True)
    child.add_argument("--first", type=int, required=True)
    child.add_argument("--count", type=int, required=True)
    child.add_argument("--users", type=int, required=True)
    args = parser.parse_args()

    try:
        import uvloop
    except ImportError:  # the lock has it; this only keeps the bench runnable without
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    if args.command == "worker":
        runner(worker(args))
        return
    if not 1 <= args.users <= args.clients:
        parser.error("--users must be between 1 and --clients")
    result = runner(Bench(args).run())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"notifier-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print(report(result))
    print(f"result: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
