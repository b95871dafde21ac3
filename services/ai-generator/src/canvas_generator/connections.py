"""The model client's HTTP connections: aiohttp's pool under the ``openai`` client's
aiohttp transport, made to cope with servers that close idle keep-alive connections.

Every HTTP server closes a keep-alive connection that stayed idle past its timeout:
uvicorn after 5 s (so vLLM and the stand-in model), Node.js and Apache httpd after 5 s,
gunicorn after 2 s, nginx after 75 s. The client learns it when its event loop reads the
close, which a loop busy with 1,000 streams does late; meanwhile a call may take the
connection from the pool and fail at once, before any byte of an answer, though the
server never saw it (``make bench SCENARIO=10s``: up to 156 attempts a run). Two
things keep that from costing a job anything:

- The pool keeps an idle connection :data:`KEEPALIVE_SECONDS` (3 s): 2 s less than the
  usual 5 s, more than a busy loop's lag. Until now it kept it 5 s, as long as those
  servers, and aiohttp hands out the connection idle longest first: under load the
  connections reused were the ones the server was closing just then.
- A call that a connection taken from the pool failed before the answer's head came
  back (aiohttp's ``ServerDisconnectedError`` or ``ClientOSError``) is sent again,
  once, at once, on a new connection, not on another from the pool, which may be as
  stale. It is one attempt and one model call: the first send never reached the model.
  Go's net/http does the same for a request it may replay. A call that failed on a
  new connection is not sent again (the server may have begun on it), nor one whose
  answer had begun (cut off: ``client.py``). The one case where the second send is a
  model call more: a server that fails on a pooled connection while the model works,
  before the head of its answer (a call not streamed; a stream's head comes first).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
import openai
import structlog
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from openai._vendor.httpx_aiohttp.transport import AiohttpTransport

log = structlog.get_logger("canvas_generator.connections")

# How long an idle connection stays in the pool, seconds: below the 5 s after which
# uvicorn, vLLM, Node.js and Apache close one (see above).
KEEPALIVE_SECONDS = 3.0
# Connections open at once, as the openai client's own default (one per streamed call).
MAX_CONNECTIONS = 1000


def http_client(timeout_seconds: float) -> httpx2.AsyncClient:
    """The ``openai`` client's aiohttp transport (its ``aiohttp`` extra) on this pool."""
    return _HttpClient(
        timeout=timeout_seconds,
        limits=httpx2.Limits(max_connections=MAX_CONNECTIONS, keepalive_expiry=KEEPALIVE_SECONDS),
    )


class _HttpClient(openai.DefaultAioHttpClient):
    """openai's aiohttp client, each of its transports (a proxy's from the environment
    too) on a session of :func:`_session`; the transports' own settings (TLS, limits,
    proxy) stay theirs."""

    def _init_transport(self, *args: Any, **kwargs: Any) -> httpx2.AsyncBaseTransport:
        return _on_pool(super()._init_transport(*args, **kwargs))

    def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> httpx2.AsyncBaseTransport:
        return _on_pool(super()._init_proxy_transport(*args, **kwargs))


def _on_pool(transport: httpx2.AsyncBaseTransport) -> httpx2.AsyncBaseTransport:
    if isinstance(transport, AiohttpTransport) and transport.client is None:
        # Called on the first request: a session is made in the running loop.
        transport.client = lambda: _session(transport)
    return transport


def _session(transport: AiohttpTransport) -> aiohttp.ClientSession:
    """The session the transport would make (AiohttpTransport.get_client), on a
    :class:`_Pool` and sending a call again as the module says."""
    limits = transport.limits
    pool = _Pool(
        keepalive_timeout=limits.keepalive_expiry,
        ssl=transport.ssl_context,
        limit=limits.max_connections or 0,  # 0: no limit, as None says to httpx2
    )
    return aiohttp.ClientSession(connector=pool, middlewares=(_send_again_if_stale,))


@dataclass
class _Send:
    """One call's sending, as the pool sees it."""

    reused: bool = False  # the connection was taken from the pool
    new: bool = False  # the pool must open a new connection


_SEND: contextvars.ContextVar[_Send | None] = contextvars.ContextVar("_SEND", default=None)


class _Pool(aiohttp.TCPConnector):
    """aiohttp's pool, which tells a call sent through :func:`_send_again_if_stale`
    whether its connection came from the pool, and can be told to open a new one."""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        send = _SEND.get()
        if send is not None and send.new:
            return None  # none from the pool: the caller opens a new connection
        connection = await super()._get(key, traces)
        if send is not None and connection is not None:
            send.reused = True
        return connection


async def _send_again_if_stale(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Send ``request``; if a pooled connection fails it before the answer's head came
    back, send it again once on a new connection (aiohttp's client middleware)."""
    send = _Send()
    token = _SEND.set(send)
    try:
        try:
            return await handler(request)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not send.reused:
                raise
            log.info(
                "call sent again on a new connection: the server had closed the pooled one",
                error=type(exc).__name__,
            )
        send.new = True
        return await handler(request)
    finally:
        _SEND.reset(token)
