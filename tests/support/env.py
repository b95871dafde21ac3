"""Where the tests find PostgreSQL and RabbitMQ: DATABASE_URL / AMQP_URL, else the
local defaults (ARCHITECTURE.md 0)."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

from canvas_events.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL


def database_url(name: str | None = None) -> str:
    """The server's URL, pointing at database ``name`` when given."""
    url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    if name is None:
        return url
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def amqp_url() -> str:
    """The broker's URL."""
    return os.environ.get("AMQP_URL") or DEFAULT_AMQP_URL


def redacted(url: str) -> str:
    """``url`` without its password."""
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)
