"""Services started as real processes with their console scripts, for end-to-end and
fault tests. Each process writes its stdout (JSON log lines) to a file we can read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(log: Path, lines: int = 40) -> str:
    """The end of the log file ``log``, for failure messages."""
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class LocalServer:
    """A server a test runs on this machine, used as a context manager: set up on
    entering the block and cleaned up on leaving it, also when setting it up fails
    halfway (a process started, a directory made)."""

    def setup(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.setup()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class ServiceProcess:
    """One service process: start, wait until ready, stop, kill -9, read its logs."""

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], log_dir: Path, ready_url: str
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.ready_url = ready_url
        self.process: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def start(self) -> None:
        """Start the process (again), appending to its log file."""
        self._starts += 1
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(BIN / self.command[0]), *self.command[1:]],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll the readiness URL until it answers 200; fail with the log tail if it dies."""
        deadline = asyncio.get_running_loop().time() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"{self.name} exited with {self.process.returncode}:\n{self.tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.ready_url)).status_code == 200:
                        return
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")
                await asyncio.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.thaw()  # a frozen process would take SIGTERM only once it runs again
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the process stops dead, its connections stay open (a paused VM, a
        long GC pause); nothing tells its peers."""
        assert self.process is not None and self.process.poll() is None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: a frozen process runs on from where it stopped."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.process is not None
        return self.process.pid

    def log_lines(self) -> list[dict[str, Any]]:
        """Every log line so far, parsed; a line that is not JSON fails the test."""
        if not self.log_path.exists():
            return []
        lines = []
        for number, raw in enumerate(self.log_path.read_text().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                raise AssertionError(f"{self.log_path}:{number} is not JSON: {raw!r}") from None
        return lines

    def tail(self, lines: int = 40) -> str:
        """The end of the log, for failure messages."""
        return tail(self.log_path, lines)
