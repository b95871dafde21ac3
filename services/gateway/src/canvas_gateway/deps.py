"""What endpoints ask for, as ``Annotated`` aliases: the settings, the store, the
broker, the metrics, the caller (``CurrentUser``, ``AdminUser``) and the request's
correlation id. Resources live on ``app.state``, set by create_app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, cast

import structlog
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from canvas_events.auth import Principal, decode_token
from canvas_events.broker import Broker
from canvas_events.errors import AuthError
from canvas_events.publishing import BatchPublisher
from canvas_gateway.ledger import LedgerSweep
from canvas_gateway.metrics import Metrics
from canvas_gateway.middleware import MISSING_TOKEN
from canvas_gateway.settings import Settings
from canvas_gateway.store import Store


def _app_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency that hands over ``app.state.<name>``, set by create_app. Async, though
    it awaits nothing: FastAPI runs a plain function in its thread pool, a hop that cost
    the gateway a fifth of its CPU per request (one per dependency)."""

    async def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    return dependency


async def get_correlation_id(request: Request) -> str:
    """The request's correlation id, chosen by RequestMiddleware."""
    return cast(str, request.state.correlation_id)


SettingsDep = Annotated[Settings, Depends(_app_state("settings"))]
StoreDep = Annotated[Store, Depends(_app_state("store"))]
BrokerDep = Annotated[Broker, Depends(_app_state("broker"))]
PublisherDep = Annotated[BatchPublisher, Depends(_app_state("publisher"))]
MetricsDep = Annotated[Metrics, Depends(_app_state("metrics"))]
LedgerDep = Annotated[LedgerSweep, Depends(_app_state("ledger"))]
CorrelationId = Annotated[str, Depends(get_correlation_id)]

# auto_error=False: the 401 below says what is wrong and carries WWW-Authenticate.
_bearer = HTTPBearer(
    auto_error=False,
    description="A JWT signed HS256 with JWT_SECRET (`canvas-gateway token --user NAME`).",
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


async def get_current_user(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller named by a valid bearer token, else 401 (RequestLimits checked it
    already, before the body was read; this is for routes outside /api/, and the docs)."""
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):
        structlog.contextvars.bind_contextvars(user_id=principal.user_id)
        return principal
    if credentials is None:
        raise _unauthorized(MISSING_TOKEN)
    try:
        principal = decode_token(credentials.credentials, settings.secret)
    except AuthError as exc:
        raise _unauthorized(str(exc)) from None
    structlog.contextvars.bind_contextvars(user_id=principal.user_id)
    return principal


CurrentUser = Annotated[Principal, Depends(get_current_user)]


async def get_admin_user(user: CurrentUser) -> Principal:
    """The caller, who must carry the admin role, else 403."""
    if not user.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="admin role required")
    return user


AdminUser = Annotated[Principal, Depends(get_admin_user)]
