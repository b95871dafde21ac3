"""A RabbitMQ node and a PostgreSQL cluster of a test's own, started from the binaries
installed on the machine, so that a fault test can stop and start them.

The machine's shared RabbitMQ (5672) and PostgreSQL (5432) are never touched: other
tests, other developers' runs and ``make dev`` use them at the same time, and a server
named by ``AMQP_URL`` / ``DATABASE_URL`` may be remote. A private server lives in a
temporary directory, listens on free ports on 127.0.0.1 only, and is removed with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.support.processes import LocalServer, free_port, tail

# Debian/Ubuntu put the real scripts here; /usr/sbin/rabbitmq-server is a wrapper that
# switches to the rabbitmq user and its home, which a private node must not share.
_RABBITMQ_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin")
_POSTGRES_GLOB = "/usr/lib/postgresql/*/bin"
# In rabbitmqctl's listing of a connection's client properties.
_CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


def _rabbitmq_bin() -> Path:
    for candidate in _RABBITMQ_DIRS:
        if (Path(candidate) / "rabbitmq-server").exists():
            return Path(candidate)
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise AssertionError(
            "fault tests need the RabbitMQ server binaries (rabbitmq-server, rabbitmqctl) "
            "installed on this machine to run a private broker node"
        )
    return Path(found).resolve().parent


def _postgres_bin() -> Path:
    found = sorted(
        Path("/").glob(_POSTGRES_GLOB.lstrip("/")),
        key=lambda path: [int(part) for part in re.findall(r"\d+", path.parent.name)],
    )
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    if initdb is None:
        raise AssertionError(
            "fault tests need the PostgreSQL server binaries (initdb, pg_ctl) installed "
            f"on this machine ({_POSTGRES_GLOB}) to run a private cluster"
        )
    return Path(initdb).resolve().parent


def _kill_group(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)


class PrivateServer(LocalServer):
    """A server in a temporary directory of its own, ``dir``, logging to its
    ``server.log``."""

    dir: Path

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.dir / "server.log", lines)


class PrivateRabbitMQ(PrivateServer):
    """One RabbitMQ node (no plugins) in a temporary directory.

    ``stop()`` + ``start()`` is a real restart of the Erlang VM on the same data
    directory: durable queues and persistent messages survive it, connections do not.
    """

    def __init__(self) -> None:
        self.bin = _rabbitmq_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="cj-rabbitmq-"))
        self.node = f"cjfault{uuid.uuid4().hex[:10]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        (self.dir / "rabbitmq.conf").write_text(
            # Only this listener: the default one would take 5672, the shared broker's.
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            # The Erlang cookie is made in (and read from) $HOME: ours, not root's or the
            # rabbitmq user's, so our rabbitmqctl talks to this node only.
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            # Not /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """AMQP_URL of this node (guest may log in from 127.0.0.1)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE ARGS``."""
        return subprocess.run(
            [str(self.bin / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 60) -> None:
        """Start the node and wait until it accepts connections."""
        self.starts += 1
        with (self.dir / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin / "rabbitmq-server")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"rabbitmq-server exited early:\n{self.log_tail()}")
            # await_startup fails at once while the node is not registered yet: poll it.
            if self.ctl("await_startup", "--timeout", "10", timeout=20).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"rabbitmq node not up after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.3)

    def stop(self, timeout: float = 30) -> None:
        """Stop the node the way an operator does (``rabbitmqctl stop``)."""
        if self.process is None or self.process.poll() is not None:
            return
        result = self.ctl("stop", timeout=timeout)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.process)
            raise AssertionError(f"rabbitmq node did not stop: {result.stderr}") from None

    def setup(self) -> None:
        self.start()

    def restart(self) -> None:
        """Stop, then start again on the same data directory."""
        self.stop()
        self.start()

    def queues(self) -> dict[str, tuple[int, int]]:
        """{queue name: (messages, consumers)} of the node's default vhost."""
        result = self.ctl(
            "list_queues", "-q", "--no-table-headers", "name", "messages", "consumers"
        )
        assert result.returncode == 0, result.stderr
        queues = {}
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3:
                queues[parts[0]] = (int(parts[1]), int(parts[2]))
        return queues

    def connections(self) -> dict[str, str]:
        """{connection process id: the client's connection_name} of every connection."""
        result = self.ctl(
            "list_connections", "-q", "--no-table-headers", "pid", "client_properties"
        )
        assert result.returncode == 0, result.stderr
        found = {}
        for line in result.stdout.splitlines():
            pid, _, properties = line.partition("\t")
            name = _CONNECTION_NAME.search(properties)
            found[pid] = name.group(1) if name else ""
        return found

    def close_connections(
        self, named: str = "", *, of_pid: int | None = None, reason: str = "closed by a test"
    ) -> int:
        """Close, as an operator does from the management UI ("force close"), every
        connection whose connection_name contains ``named`` (all by default), or, with
        ``of_pid``, every connection of that service process (canvas-jobs names its
        connections ``<service>-<host>-<pid>[-<suffix>]``); how many."""
        owned = re.compile(rf"-{of_pid}(-|$)") if of_pid is not None else None
        closed = 0
        for pid, name in self.connections().items():
            if named in name and (owned is None or owned.search(name)):
                # A connection that went meanwhile is no failure.
                self.ctl("close_connection", pid, reason)
                closed += 1
        return closed

    def delete_queues(self) -> list[str]:
        """Delete every queue of the node, exclusive ones included, as an operator can
        from the management UI; the names deleted."""
        names = list(self.queues())
        for name in names:
            result = self.ctl("delete_queue", name)
            assert result.returncode == 0, result.stderr
        return names

    def cleanup(self) -> None:
        """Stop the node whatever state it is in, and remove its directory."""
        with contextlib.suppress(Exception):  # the kill below is the fallback
            self.stop(timeout=20)
        _kill_group(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres(PrivateServer):
    """One PostgreSQL cluster (trust authentication) in a temporary directory.

    initdb refuses to run as root, so as root the server commands run as the
    ``postgres`` user (``runuser``), which then owns the directory.
    """

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="cj-postgres-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.starts = 0

    def url(self, database: str = "postgres") -> str:
        """A DATABASE_URL for ``database`` on this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.dir
        )

    def setup(self) -> None:
        self.init()
        self.start()

    def init(self) -> None:
        """Create the cluster."""
        result = self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )
        assert result.returncode == 0, f"initdb failed:\n{result.stdout}\n{result.stderr}"

    def start(self) -> None:
        """``pg_ctl -w start`` on the same port and data directory every time."""
        self.starts += 1
        options = " ".join(
            (
                f"-c port={self.port}",
                "-c listen_addresses=127.0.0.1",
                # The socket beside the data, not in /var/run/postgresql of the shared one.
                f"-c unix_socket_directories={self.dir}",
                # Every stop here is a clean shutdown (it writes a checkpoint); fsync only
                # protects against a machine crash, which no test simulates.
                "-c fsync=off",
                "-c max_connections=200",
            )
        )
        result = self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        assert result.returncode == 0, f"pg_ctl start failed:\n{result.stderr}\n{self.log_tail()}"

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl -w stop -m MODE``: fast disconnects every client and shuts down."""
        result = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop")
        assert result.returncode == 0, f"pg_ctl stop failed:\n{result.stderr}"

    def restart(self) -> None:
        """Stop (fast), then start again."""
        self.stop()
        self.start()

    def running(self) -> bool:
        result = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "status")
        return result.returncode == 0

    def cleanup(self) -> None:
        """Stop the cluster at once whatever state it is in, and remove its directory."""
        if self.data.exists() and self.running():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
