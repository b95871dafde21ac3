"""Bearer JWTs (ARCHITECTURE.md 3): HS256 signed with JWT_SECRET, ``sub`` is the user,
``exp`` is checked, ``roles`` may hold ``"admin"``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from canvas_events.errors import AuthError

ALGORITHM = "HS256"


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for."""

    user_id: str
    roles: frozenset[str]
    expires_at: datetime

    @property
    def is_admin(self) -> bool:
        """Whether the token carries the admin role."""
        return "admin" in self.roles


def decode_token(token: str, secret: str) -> Principal:
    """Check a token's signature and expiry; raise :class:`AuthError` saying what is wrong."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise AuthError("invalid token: sub must be a non-empty string")
    roles = claims.get("roles") or []
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise AuthError("invalid token: roles must be a list of strings")
    return Principal(sub, frozenset(roles), datetime.fromtimestamp(claims["exp"], UTC))


def mint_token(
    user_id: str, secret: str, *, admin: bool = False, ttl: timedelta = timedelta(days=7)
) -> str:
    """A signed token for ``user_id`` (development and tests)."""
    now = datetime.now(UTC)
    claims = {
        "sub": user_id,
        "iat": now,
        "exp": now + ttl,
        "roles": ["admin"] if admin else [],
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
