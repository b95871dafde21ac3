"""`make dev`'s supervisor: it keeps each service's process running, as a process manager
would in production, so that one service dying shows what the others and the clients do
about it (the page reconnects, jobs wait and resume) instead of ending the session.

A process that exits is started again after a back-off: 1 s, then doubling up to 30 s
while it keeps dying within 30 s of its start; once it has stayed up that long, the
next restart waits 1 s again. Stopping (Ctrl-C, SIGTERM) sends SIGTERM to every
process, newest first, and SIGKILL to any still running after the grace period.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
# Up this long: the process is taken as healthy again, and its back-off starts over.
STABLE_SECONDS = 30.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Supervised:
    """One service: its command, its process, and when it may start again."""

    name: str
    command: Sequence[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while it waits to be started again
    backoff: float = FIRST_BACKOFF
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)  # when each of its processes began


class Supervisor:
    """Starts the commands, restarts whichever exits (with back-off), stops them all."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        first_backoff: float = FIRST_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        stable_seconds: float = STABLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.env = dict(env)
        self.services: list[Supervised] = []
        self._first, self._max, self._stable = first_backoff, max_backoff, stable_seconds
        self._clock = clock

    def start(self, name: str, command: Sequence[str]) -> Supervised:
        """Start ``command`` as service ``name``; it is supervised from now on."""
        service = Supervised(name, list(command), backoff=self._first)
        self.services.append(service)
        self._spawn(service)
        return service

    def _spawn(self, service: Supervised) -> None:
        service.process = subprocess.Popen(list(service.command), env=self.env)
        service.started_at = self._clock()
        service.starts.append(service.started_at)
        service.restart_at = None

    def check(self) -> None:
        """Once per tick: note the processes that exited, start those whose wait is over."""
        now = self._clock()
        for service in self.services:
            process = service.process
            if service.restart_at is None and process is not None and process.poll() is not None:
                self._exited(service, process.returncode, now)
            elif service.restart_at is not None and now >= service.restart_at:
                service.restarts += 1
                say(f"dev: starting {service.name} again (restart {service.restarts})")
                self._spawn(service)

    def _exited(self, service: Supervised, code: int, now: float) -> None:
        service.exit_codes.append(code)
        if now - service.started_at >= self._stable:
            service.backoff = self._first  # it ran well for a while: a fresh start
        wait = service.backoff
        service.restart_at = now + wait
        service.backoff = min(service.backoff * 2, self._max)
        say(f"dev: {service.name} exited with {code}; starting it again in {wait:g}s")

    def run(self, tick: float = 0.5) -> None:
        """Supervise until interrupted (KeyboardInterrupt, which ``make dev`` maps SIGTERM
        to)."""
        while True:
            self.check()
            time.sleep(tick)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to every process, newest first; SIGKILL to those still up after
        ``grace`` seconds."""
        running = [s.process for s in reversed(self.services) if s.process is not None]
        for process in running:
            if process.poll() is None:
                process.terminate()
        for process in running:
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
