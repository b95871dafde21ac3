"""Bearer JWTs (docs/api.md, "Authentication"): HS256 signed with JWT_SECRET, ``sub`` is the user,
``exp`` is checked, ``roles`` may hold ``"admin"``.

The services' internal APIs (the orchestrator's ``/internal/*``) answer only callers
with role ``"service"`` (docs/api.md, "Internal API of the orchestrator"): a
:class:`ServiceCredential` mints such a token from JWT_SECRET and mints it again before
it expires."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from canvas_events.errors import AuthError

ALGORITHM = "HS256"
ADMIN_ROLE = "admin"
SERVICE_ROLE = "service"
NOT_A_JWT = "invalid token: not a JWT (expected header.payload.signature, base64url)"


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for."""

    user_id: str
    roles: frozenset[str]
    expires_at: datetime

    @property
    def is_admin(self) -> bool:
        """Whether the token carries the admin role."""
        return ADMIN_ROLE in self.roles

    @property
    def is_service(self) -> bool:
        """Whether the token speaks for one of the system's own services."""
        return SERVICE_ROLE in self.roles


def decode_token(token: str, secret: str) -> Principal:
    """Check a token's signature and expiry; raise :class:`AuthError` saying what is wrong."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError as exc:  # a DecodeError too: keep it apart from garbage
        raise AuthError(f"invalid token: {exc}") from None
    except jwt.DecodeError:
        # PyJWT says "Not enough segments", or a base64 or utf-8 codec's complaint about a
        # segment: what the caller needs to hear is that this is not a JWT at all.
        raise AuthError(NOT_A_JWT) from None
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
    user_id: str,
    secret: str,
    *,
    admin: bool = False,
    ttl: timedelta = timedelta(days=7),
    roles: tuple[str, ...] = (),
) -> str:
    """A signed token for ``user_id`` (development, tests, and service credentials)."""
    now = datetime.now(UTC)
    claims = {
        "sub": user_id,
        "iat": now,
        "exp": now + ttl,
        "roles": [*roles, ADMIN_ROLE] if admin else list(roles),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class ServiceCredential:
    """The ``Authorization`` header a service sends to another's internal API: a token
    with role ``service`` for ``sub`` ``service:<name>``, valid for ``ttl`` and minted
    again once less than a tenth of it is left."""

    def __init__(self, service: str, secret: str, *, ttl: timedelta = timedelta(hours=1)) -> None:
        self._subject = f"service:{service}"
        self._secret = secret
        self._ttl = ttl
        self._token = ""
        self._renew_at = datetime.min.replace(tzinfo=UTC)

    def headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <token>"}``, with a token valid for a while yet."""
        now = datetime.now(UTC)
        if now >= self._renew_at:
            self._token = mint_token(
                self._subject, self._secret, ttl=self._ttl, roles=(SERVICE_ROLE,)
            )
            self._renew_at = now + self._ttl * 0.9
        return {"Authorization": f"Bearer {self._token}"}
