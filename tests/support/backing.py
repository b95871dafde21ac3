"""Where the suite's PostgreSQL and RabbitMQ come from (ARCHITECTURE.md 0, `make test`):

1. the server ``DATABASE_URL`` / ``AMQP_URL`` names, when set (never replaced: if it
   does not answer, the run fails saying so);
2. else the local default (README.md, "1. Get PostgreSQL and RabbitMQ"), when it answers;
3. else, where a Docker engine answers, a container that testcontainers starts for the
   session; its URL is put in ``DATABASE_URL`` / ``AMQP_URL`` of this process, so that
   every helper (tests/support/env.py) and every service a test starts gets it;
4. else the run fails at once, naming what did not answer and both ways out.

:func:`choose` is the decision and does no I/O; :func:`survey` probes, :func:`provide`
starts what is needed (tests/conftest.py calls it before any test), and tests/preflight.py
says beforehand what will happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiormq
import asyncpg

from canvas_events.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL
from tests.support.env import redacted, with_database

Source = Literal["given", "local", "container", "missing"]
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
PROBE_SECONDS = 5.0
CONTAINER_READY_SECONDS = 120.0


@dataclass(frozen=True)
class Backing:
    """One server the suite needs, and how to run it in a container."""

    name: str  # what a person calls it
    variable: str  # the environment variable that names it
    default_url: str
    image: str
    port: int  # the one it listens on inside its container
    env: tuple[tuple[str, str], ...]  # the container's environment
    url_template: str  # {host} and {port}: its URL once started

    def container_url(self, host: str, port: int) -> str:
        return self.url_template.format(host=host, port=port)


POSTGRES = Backing(
    name="PostgreSQL",
    variable="DATABASE_URL",
    default_url=DEFAULT_DATABASE_URL,
    image="postgres:16-alpine",
    port=5432,
    env=(("POSTGRES_PASSWORD", "canvas-tests"),),
    url_template="postgresql://postgres:canvas-tests@{host}:{port}/canvas_jobs",
)
RABBITMQ = Backing(
    name="RabbitMQ",
    variable="AMQP_URL",
    default_url=DEFAULT_AMQP_URL,
    image="rabbitmq:3.13-alpine",
    port=5672,
    env=(("RABBITMQ_DEFAULT_USER", "guest"), ("RABBITMQ_DEFAULT_PASS", "guest")),
    url_template="amqp://guest:guest@{host}:{port}/",
)
BACKINGS = (POSTGRES, RABBITMQ)


@dataclass(frozen=True)
class Found:
    """What a survey found for one backing."""

    backing: Backing
    url: str  # the one asked (given or the local default)
    given: bool
    error: str | None  # None: it answered


@dataclass(frozen=True)
class Choice:
    backing: Backing
    source: Source
    url: str
    why: str  # one line for a person


class Unavailable(RuntimeError):
    """The suite cannot have its PostgreSQL or RabbitMQ; the message says what to do."""


# -- the decision ------------------------------------------------------------------------


def choose(found: Found, docker_error: str | None) -> Choice:
    """Where ``found.backing`` comes from, given what answered (no I/O)."""
    backing, where = found.backing, redacted(found.url)
    if found.error is None:
        source: Source = "given" if found.given else "local"
        return Choice(backing, source, found.url, f"{backing.name} at {where}")
    if found.given:
        why = (
            f"{backing.variable} names {where}, which does not answer ({found.error}); "
            f"fix it, or unset it to use the local default or a container"
        )
        return Choice(backing, "missing", found.url, why)
    if docker_error is None:
        why = f"nothing answers at {where}: testcontainers starts {backing.image}"
        return Choice(backing, "container", found.url, why)
    why = (
        f"nothing answers at {where} ({found.error}), and no Docker engine answers "
        f"for testcontainers ({docker_error})"
    )
    return Choice(backing, "missing", found.url, why)


def failure(choices: list[Choice]) -> str | None:
    """The message to fail with, or None when every backing has a source."""
    missing = [choice for choice in choices if choice.source == "missing"]
    if not missing:
        return None
    names = " and ".join(choice.backing.name for choice in missing)
    lines = [f"the tests need PostgreSQL and RabbitMQ, and cannot have {names}:"]
    lines += [f"  - {choice.why}" for choice in missing]
    lines.append(
        "Either run them here (README.md, step 1; or set DATABASE_URL / AMQP_URL to "
        "servers of yours), or run a Docker engine (DOCKER_HOST, else "
        f"{DEFAULT_DOCKER_HOST}) and the tests start them in containers (testcontainers)."
    )
    return "\n".join(lines)


# -- probing -----------------------------------------------------------------------------


async def _answers(backing: Backing, url: str) -> str | None:
    """None when the server at ``url`` takes a connection, else why not."""
    try:
        if backing is POSTGRES:
            # The server, not its database: the tests make databases of their own.
            connection = await asyncpg.connect(
                with_database(url, "postgres"), timeout=PROBE_SECONDS
            )
            await connection.close()
        else:
            # aiormq, not aio_pika: a failed aio_pika.connect leaves a Connection whose
            # __del__ schedules close() on a loop that may not run by then (a "never
            # awaited" warning, an error under filterwarnings, in whichever test GC hits).
            amqp = await asyncio.wait_for(aiormq.connect(url), PROBE_SECONDS)
            await amqp.close()
    except Exception as exc:
        return redacted(f"{type(exc).__name__}: {exc}")
    return None


def docker_error(docker_host: str | None = None) -> str | None:
    """None when a Docker engine answers ``GET /_ping`` at ``docker_host`` (DOCKER_HOST,
    else the default socket), else why not. Plain sockets: the docker SDK leaves one
    open when the engine is away."""
    where = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    parts = urlsplit(where)
    try:
        if parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = parts.path
        elif parts.scheme in ("tcp", "http", "https"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (parts.hostname, parts.port or 2375)
        else:
            return f"DOCKER_HOST {where}: unknown scheme"
        with sock:
            sock.settimeout(PROBE_SECONDS)
            sock.connect(address)
            if parts.scheme == "https":
                return None  # TLS: it listens; testcontainers does the handshake
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status = sock.recv(64).split(b"\r\n", 1)[0]
    except OSError as exc:
        return f"{where}: {type(exc).__name__}: {exc.strerror or exc}"
    return None if b" 200" in status else f"{where}: answered {status!r}"


async def survey(
    env: dict[str, str] | None = None, backings: tuple[Backing, ...] = BACKINGS
) -> list[Found]:
    """Each backing: the URL the environment names (else its local default) and
    whether it answers."""
    env = dict(os.environ) if env is None else env
    found = []
    for backing in backings:
        given = env.get(backing.variable) or None
        url = given or backing.default_url
        found.append(Found(backing, url, given is not None, await _answers(backing, url)))
    return found


def plan(found: list[Found], docker: Callable[[], str | None] = docker_error) -> list[Choice]:
    """The choice for each backing; Docker is asked only when a container is needed."""
    needs_docker = any(item.error is not None and not item.given for item in found)
    engine = docker() if needs_docker else None
    return [choose(item, engine) for item in found]


# -- containers ------------------------------------------------------------------------


Starter = Callable[[Backing], tuple[str, Callable[[], None]]]


def start_container(backing: Backing) -> tuple[str, Callable[[], None]]:
    """Start ``backing``'s image with testcontainers; its URL once it answers, and how
    to remove it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # testcontainers' own deprecations
        from testcontainers.core.container import DockerContainer

        container = DockerContainer(backing.image).with_exposed_ports(backing.port)
        for key, value in backing.env:
            container = container.with_env(key, value)
        container.start()
    url = backing.container_url(
        container.get_container_host_ip(), int(container.get_exposed_port(backing.port))
    )
    deadline = time.monotonic() + CONTAINER_READY_SECONDS
    while (error := asyncio.run(_answers(backing, url))) is not None:
        if time.monotonic() > deadline:
            container.stop()
            raise Unavailable(f"{backing.name} in its container never answered: {error}")
        time.sleep(0.5)
    return url, container.stop


@contextlib.contextmanager
def provided(
    env: dict[str, str] | None = None,
    *,
    starter: Starter = start_container,
    docker: Callable[[], str | None] = docker_error,
    backings: tuple[Backing, ...] = BACKINGS,
) -> Iterator[list[Choice]]:
    """For the block: every backing has a source, and a container's URL is in ``env``
    (os.environ by default) under its variable; raise :class:`Unavailable` otherwise."""
    target: Any = os.environ if env is None else env
    choices = plan(asyncio.run(survey(dict(target), backings)), docker)
    message = failure(choices)
    if message is not None:
        raise Unavailable(message)
    stops: list[Callable[[], None]] = []
    try:
        for index, choice in enumerate(choices):
            if choice.source == "container":
                url, stop = starter(choice.backing)
                stops.append(stop)
                target[choice.backing.variable] = url
                choices[index] = Choice(choice.backing, "container", url, choice.why)
        yield choices
    finally:
        for stop in stops:
            stop()
