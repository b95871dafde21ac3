"""The whole system as real processes: the four services and the stand-in model, each
started with its console script, on free ports, against one database and one topology
prefix of its own. Fault tests add replicas (a second orchestrator or generator, each a
process of its own on its own port) with :meth:`System.add_replica`."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from canvas_events.auth import ServiceCredential, mint_token
from tests.support.fake_openai import StandIn
from tests.support.processes import ServiceProcess, free_port

JWT_SECRET = "e2e-test-secret-that-is-long-enough-for-hs256"
OPENAI_KEY = "sk-e2e-test-key-0123456789"
# Console script and port variable of each kind of service that can run as several
# processes (System.add_replica).
REPLICA_COMMANDS = {
    "orchestrator": ("canvas-orchestrator", "ORCHESTRATOR_PORT"),
    "generator": ("canvas-generator", "GENERATOR_PORT"),
    "notifier": ("canvas-notifier", "NOTIFIER_PORT"),
    "gateway": ("canvas-gateway", "GATEWAY_PORT"),
}


@dataclass
class System:
    """Ports, URLs and processes of one running canvas-jobs."""

    database_url: str
    amqp_url: str
    prefix: str
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ports = {
            "gateway": free_port(),
            "notifier": free_port(),
            "orchestrator": free_port(),
            "generator": free_port(),
            "fake-openai": free_port(),
        }
        env = {
            "DATABASE_URL": self.database_url,
            "AMQP_URL": self.amqp_url,
            "AMQP_TOPOLOGY_PREFIX": self.prefix,
            "JWT_SECRET": JWT_SECRET,
            "OPENAI_API_KEY": OPENAI_KEY,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.ports['fake-openai']}/v1",
            "OPENAI_MODEL": "fake-canvas-1",
            "OPENAI_TIMEOUT_SECONDS": "10",
            "MAX_JOB_RETRIES": "0",
            "RETRY_BACKOFF_UNIT_SECONDS": "0.2",
            "GATEWAY_PORT": str(self.ports["gateway"]),
            "NOTIFIER_PORT": str(self.ports["notifier"]),
            "ORCHESTRATOR_PORT": str(self.ports["orchestrator"]),
            "GENERATOR_PORT": str(self.ports["generator"]),
            # The generator asks the orchestrator whether an attempt is still current;
            # this system's, not whatever listens on the default port.
            "ORCHESTRATOR_URL": f"http://127.0.0.1:{self.ports['orchestrator']}",
            "FAKE_OPENAI_PORT": str(self.ports["fake-openai"]),
            "FAKE_OPENAI_REQUIRE_KEY": OPENAI_KEY,
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "json",
            **self.extra_env,
        }
        self.env = env

        def add(name: str, command: str, port_name: str, ready_path: str = "/ready") -> None:
            url = f"http://127.0.0.1:{self.ports[port_name]}{ready_path}"
            self.processes[name] = ServiceProcess(name, [command], env, self.log_dir, url)

        add("fake-openai", "canvas-fake-openai", "fake-openai", "/health")
        add("orchestrator", "canvas-orchestrator", "orchestrator")
        add("generator", "canvas-generator", "generator")
        add("notifier", "canvas-notifier", "notifier")
        add("gateway", "canvas-gateway", "gateway")

    def add_replica(self, kind: str, name: str) -> ServiceProcess:
        """One more process of ``kind`` (``orchestrator``, ``generator``, ...) named
        ``name``, on a port of its own; started by :meth:`start` like the others (or by
        hand when the system already runs)."""
        command, port_variable = REPLICA_COMMANDS[kind]
        assert name not in self.processes, f"{name} exists already"
        self.ports[name] = free_port()
        env = {**self.env, port_variable: str(self.ports[name])}
        url = f"http://127.0.0.1:{self.ports[name]}/ready"
        self.processes[name] = ServiceProcess(name, [command], env, self.log_dir, url)
        return self.processes[name]

    def url(self, name: str) -> str:
        """Where process ``name`` serves HTTP."""
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def fake_openai_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['fake-openai']}"

    @property
    def stand_in(self) -> StandIn:
        """The test controls of the system's stand-in model."""
        return StandIn(self.fake_openai_url)

    def websocket_url(
        self, token: str, after: int | None = None, *, notifier: str = "notifier"
    ) -> str:
        """The WebSocket address of notifier process ``notifier``."""
        url = f"ws://127.0.0.1:{self.ports[notifier]}/ws?token={token}"
        return url if after is None else f"{url}&after={after}"

    def token(self, user_id: str, *, admin: bool = False) -> str:
        return mint_token(user_id, JWT_SECRET, admin=admin)

    def service_headers(self) -> dict[str, str]:
        """The credential the orchestrator's internal API asks for."""
        return ServiceCredential("tests", JWT_SECRET).headers()

    async def start(self) -> None:
        """Start every process and wait until each is ready."""
        for process in self.processes.values():
            process.start()
        await asyncio.gather(*(p.wait_ready() for p in self.processes.values()))

    def stop(self) -> None:
        """SIGTERM every process (SIGKILL what does not stop)."""
        for process in reversed(self.processes.values()):
            process.stop()


@contextlib.asynccontextmanager
async def running_system(
    log_dir: Path,
    *,
    label: str,
    extra_env: dict[str, str] | None = None,
    database: str | None = None,
) -> AsyncIterator[System]:
    """A whole system on a database and topology prefix of its own, started and ready;
    stopped, and both removed, afterwards (a module fixture's body). ``database`` is the
    URL the services get (its database is created and dropped here, e.g. one with a
    password in it); by default a new one named after ``label``."""
    from canvas_events.topology import Topology
    from tests.conftest import delete_topology
    from tests.support.env import amqp_url, create_database, database_url, drop_database

    url = database or database_url(f"cj_{label}_{uuid.uuid4().hex[:12]}")
    await create_database(url)
    prefix = f"{label[:1]}{uuid.uuid4().hex[:10]}"
    running = System(url, amqp_url(), prefix, log_dir, extra_env=extra_env or {})
    try:
        await running.start()
        yield running
    finally:
        running.stop()
        await delete_topology(amqp_url(), Topology(prefix))
        await drop_database(url)
