"""Tokens an attacker would try: unsigned (``alg: none``), signed with another secret,
expired. What the services must refuse, in one place for every service's tests."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from datetime import timedelta

from canvas_events.auth import mint_token

ANOTHER_SECRET = "not-the-services-secret-0123456789-abcdefghij"


def _part(value: Mapping[str, object]) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unsigned(user_id: str, *, admin: bool = True) -> str:
    """An ``alg: none`` token: claims anyone can write, with no signature at all."""
    header = {"alg": "none", "typ": "JWT"}
    claims = {"sub": user_id, "exp": int(time.time()) + 3600, "roles": ["admin"] if admin else []}
    return f"{_part(header)}.{_part(claims)}."


def forged(user_id: str, *, admin: bool = True) -> str:
    """A well-formed token signed with a secret that is not the services'."""
    return mint_token(user_id, ANOTHER_SECRET, admin=admin)


def expired(user_id: str, secret: str) -> str:
    """A token the services' secret signed, expired a minute ago."""
    return mint_token(user_id, secret, ttl=timedelta(seconds=-60))


def bad_tokens(user_id: str, secret: str) -> dict[str, str]:
    """Every kind of bad token, by name."""
    return {
        "alg-none": unsigned(user_id),
        "wrong-secret": forged(user_id),
        "expired": expired(user_id, secret),
        "garbage": "not.a.jwt",
    }
