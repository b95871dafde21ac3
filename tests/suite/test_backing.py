"""Where the suite's PostgreSQL and RabbitMQ come from (tests/support/backing.py): the
decision for every case, the probes on real sockets (the local servers, a port where
nothing listens, a Docker socket that is not there and one that answers), and a
container's URL reaching the helpers and the processes a test starts.

No Docker engine runs where these tests run, so the container itself is a stand-in
(``starter``) here; everything around it is real."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import backing, env
from tests.support.backing import POSTGRES, RABBITMQ, Backing, Found

ROOT = Path(__file__).resolve().parents[2]
DEAD_PG = "postgresql://postgres@127.0.0.1:1/canvas_jobs"
DEAD_AMQP = "amqp://guest:guest@127.0.0.1:1/"
NO_DOCKER = "unix:///nonexistent/docker.sock: FileNotFoundError"


def found(item: Backing, *, given: bool = False, answers: bool = True) -> Found:
    return Found(item, item.default_url, given, None if answers else "refused")


# -- the decision ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "answers", "docker", "source"),
    [
        (True, True, None, "given"),
        (True, True, NO_DOCKER, "given"),
        (True, False, None, "missing"),  # a server named on purpose is never replaced
        (False, True, NO_DOCKER, "local"),
        (False, False, None, "container"),
        (False, False, NO_DOCKER, "missing"),
    ],
)
def test_the_source_of_each_server(given: bool, answers: bool, docker: str | None, source: str):
    choice = backing.choose(found(POSTGRES, given=given, answers=answers), docker)
    assert choice.source == source


def test_docker_is_asked_only_when_a_container_is_needed() -> None:
    asked: list[bool] = []

    def docker() -> None:
        asked.append(True)

    backing.plan([found(POSTGRES), found(RABBITMQ)], docker)
    assert asked == []
    choices = backing.plan([found(POSTGRES), found(RABBITMQ, answers=False)], docker)
    assert asked == [True]
    assert [c.source for c in choices] == ["local", "container"]


def test_the_failure_names_what_is_missing_and_both_ways_out() -> None:
    choices = [
        backing.choose(found(POSTGRES, answers=False), NO_DOCKER),
        backing.choose(found(RABBITMQ, given=True, answers=False), None),
    ]
    message = backing.failure(choices)
    assert message is not None
    assert "cannot have PostgreSQL and RabbitMQ" in message
    assert NO_DOCKER in message
    assert "AMQP_URL names amqp://guest:***@" in message  # never the password
    assert "run them here" in message and "run a Docker engine" in message
    assert backing.failure([backing.choose(found(POSTGRES), NO_DOCKER)]) is None


# -- the probes, on real sockets -----------------------------------------------------------


async def test_the_local_servers_answer_and_a_closed_port_does_not() -> None:
    answered = await backing.survey({})
    assert [(f.backing.name, f.given, f.error) for f in answered] == [
        ("PostgreSQL", False, None),
        ("RabbitMQ", False, None),
    ]
    dead = await backing.survey({"DATABASE_URL": DEAD_PG, "AMQP_URL": DEAD_AMQP})
    assert [(f.given, f.error is not None) for f in dead] == [(True, True), (True, True)]


def test_no_docker_engine_is_reported_with_where_it_was_looked_for() -> None:
    error = backing.docker_error("unix:///nonexistent/docker.sock")
    assert error is not None and error.startswith(NO_DOCKER)
    assert backing.docker_error("tcp://127.0.0.1:1") is not None


@pytest.fixture
def docker_socket(tmp_path: Path) -> Iterator[str]:
    """A Unix socket that answers Docker's /_ping as an engine does."""
    path = tmp_path / "docker.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def answer() -> None:
        with contextlib.suppress(OSError):
            connection, _ = server.accept()
            with connection:
                connection.recv(1024)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield f"unix://{path}"
    server.close()
    thread.join(5)


def test_an_engine_that_answers_its_ping_is_found(docker_socket: str) -> None:
    assert backing.docker_error(docker_socket) is None


# -- what the run gets -------------------------------------------------------------------


def without_local(item: Backing, dead_url: str) -> Backing:
    """``item`` as on a machine where its local default does not answer."""
    return dataclasses.replace(item, default_url=dead_url)


def test_a_started_container_reaches_the_helpers_and_the_processes_a_test_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AMQP_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    started: list[str] = []
    stopped: list[str] = []

    def starter(item: Backing) -> tuple[str, Callable[[], None]]:
        # The container's broker: the local one, under a URL of its own.
        started.append(item.name)
        return "amqp://guest:guest@localhost:5672/", lambda: stopped.append(item.name)

    backings = (POSTGRES, without_local(RABBITMQ, DEAD_AMQP))
    with backing.provided(starter=starter, docker=lambda: None, backings=backings) as choices:
        assert [(c.backing.name, c.source) for c in choices] == [
            ("PostgreSQL", "local"),
            ("RabbitMQ", "container"),
        ]
        assert env.amqp_url() == "amqp://guest:guest@localhost:5672/"
        assert "DATABASE_URL" not in os.environ  # the local one stays the default
        child = subprocess.run(
            [sys.executable, "-c", "from tests.support.env import amqp_url; print(amqp_url())"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == "amqp://guest:guest@localhost:5672/"
        assert stopped == []
    assert (started, stopped) == (["RabbitMQ"], ["RabbitMQ"])


def test_with_neither_a_server_nor_docker_the_run_ends_saying_why() -> None:
    backings = (without_local(POSTGRES, DEAD_PG), without_local(RABBITMQ, DEAD_AMQP))

    def never(item: Backing) -> tuple[str, Callable[[], None]]:
        raise AssertionError("no container may be started")

    with (
        pytest.raises(backing.Unavailable) as raised,
        backing.provided(
            {},
            starter=never,
            docker=lambda: backing.docker_error("unix:///nonexistent/docker.sock"),
            backings=backings,
        ),
    ):
        pass
    message = str(raised.value)
    assert "cannot have PostgreSQL and RabbitMQ" in message
    assert "127.0.0.1:1" in message and NO_DOCKER in message
    assert "run them here" in message and "run a Docker engine" in message


def test_make_tests_preflight_names_a_given_server_that_does_not_answer() -> None:
    answer = subprocess.run(
        [sys.executable, "-m", "tests.preflight"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": DEAD_PG},
        capture_output=True,
        text=True,
        check=False,
    )
    assert answer.returncode == 1
    assert f"DATABASE_URL names {DEAD_PG}, which does not answer" in answer.stderr
