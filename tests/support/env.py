"""Where the tests find PostgreSQL and RabbitMQ: DATABASE_URL / AMQP_URL, else the
local defaults (README.md, step 1); and databases of a test's own, made and
dropped on a PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from canvas_events.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL


def database_url(name: str | None = None) -> str:
    """The server's URL, pointing at database ``name`` when given."""
    url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    return url if name is None else with_database(url, name)


def amqp_url() -> str:
    """The broker's URL."""
    return os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL


def redacted(url: str) -> str:
    """``url`` without its password."""
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` of the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def admin_connection(
    url: str | None = None, *, timeout: float = 60
) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the maintenance database (``postgres``) of the server of ``url``
    (the tests' server by default), for the block."""
    connection = await asyncpg.connect(
        with_database(url or database_url(), "postgres"), timeout=timeout
    )
    try:
        yield connection
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def transaction_in_another_database(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A write transaction open in the maintenance database of ``url``'s server for the
    block (its id assigned on entry: older than anything written after), rolled back on
    the way out."""
    async with admin_connection(url) as other:
        transaction = other.transaction()
        await transaction.start()
        try:
            await other.fetchval("SELECT pg_current_xact_id()")
            yield other
        finally:
            await transaction.rollback()


async def create_database(url: str) -> None:
    """Create the (new) database ``url`` names, on its server."""
    async with admin_connection(url) as connection:
        await connection.execute(f'CREATE DATABASE "{_name(url)}"')


async def drop_database(url: str, *, timeout: float = 60) -> None:
    """Drop the database ``url`` names, if it is there, whoever is connected to it."""
    async with admin_connection(url, timeout=timeout) as connection:
        await connection.execute(f'DROP DATABASE IF EXISTS "{_name(url)}" WITH (FORCE)')


def _name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")
