"""`make dev`'s supervisor on real processes: a service that dies is started again, the
others keep running, the waits grow while it keeps dying and start over once it ran
well, and stopping ends every process."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tools.supervisor import Supervised, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
CRASHER = [sys.executable, "-c", "raise SystemExit(3)"]


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    made: list[Supervisor] = []
    yield made
    for supervisor in made:
        supervisor.stop(grace=5)


def until(condition: Callable[[], bool], supervisor: Supervisor, timeout: float = 15) -> None:
    """Run the supervisor's ticks until ``condition`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        supervisor.check()
        time.sleep(0.02)


def running(service: Supervised) -> bool:
    return service.process is not None and service.process.poll() is None


def test_a_service_that_dies_is_started_again_and_the_others_keep_running(
    supervisors: list[Supervisor],
) -> None:
    supervisor = Supervisor(dict(os.environ), first_backoff=0.2)
    supervisors.append(supervisor)
    victim, bystander = supervisor.start("victim", SLEEPER), supervisor.start("other", SLEEPER)
    assert victim.process is not None and bystander.process is not None
    first_pid, other_pid = victim.process.pid, bystander.process.pid

    os.kill(first_pid, signal.SIGKILL)
    until(lambda: victim.restarts == 1 and running(victim), supervisor)

    assert victim.process.pid != first_pid
    assert victim.exit_codes == [-signal.SIGKILL]
    assert victim.starts[1] - victim.starts[0] >= 0.2  # the back-off was waited
    assert (bystander.process.pid, running(bystander), bystander.restarts) == (other_pid, True, 0)

    supervisor.stop(grace=5)
    assert not running(victim) and not running(bystander)


def test_the_wait_doubles_while_a_service_keeps_dying_up_to_the_maximum(
    supervisors: list[Supervisor],
) -> None:
    supervisor = Supervisor(dict(os.environ), first_backoff=0.1, max_backoff=0.4)
    supervisors.append(supervisor)
    crasher = supervisor.start("crasher", CRASHER)

    until(lambda: len(crasher.starts) >= 5, supervisor)

    gaps = [later - earlier for earlier, later in itertools.pairwise(crasher.starts)]
    for gap, wait in zip(gaps[:4], [0.1, 0.2, 0.4, 0.4], strict=True):
        assert wait <= gap < wait + 1.0, gaps
    assert crasher.exit_codes[:4] == [3, 3, 3, 3]


def test_the_wait_starts_over_once_a_service_stayed_up(supervisors: list[Supervisor]) -> None:
    now = [1000.0]
    supervisor = Supervisor(
        dict(os.environ), first_backoff=1, max_backoff=30, stable_seconds=30, clock=lambda: now[0]
    )
    supervisors.append(supervisor)
    service = supervisor.start("service", SLEEPER)

    def die_after(seconds: float) -> float:
        """Let ``seconds`` pass, kill the process; how long it is told to wait."""
        assert service.process is not None
        now[0] += seconds
        service.process.kill()
        service.process.wait()
        supervisor.check()
        assert service.restart_at is not None
        wait = service.restart_at - now[0]
        now[0] = service.restart_at
        supervisor.check()  # started again
        assert running(service)
        return wait

    assert [die_after(1), die_after(1), die_after(1)] == [1, 2, 4]
    assert die_after(31) == 1  # it ran well: a fresh start
    assert die_after(1) == 2
