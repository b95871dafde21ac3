"""The live canvas page at ``/``: plain HTML, CSS and JavaScript from ``static/`` (no
build step), and ``/config.json``, which tells the page where the notifier's WebSocket
is (it listens on another port, or behind another host name)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Final

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse

from canvas_gateway.deps import SettingsDep
from canvas_gateway.settings import Settings

router = APIRouter(include_in_schema=False)

STATIC_DIR: Final = Path(__file__).resolve().parent.parent / "static"
# Every file the page loads, and its type: nothing else under static/ is served.
_ASSETS: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# A host name or an IPv4 address, or an IPv6 address (without its brackets): the Host
# header is the client's to write, and it goes into a URL and a CSP header.
_HOST_NAME: Final = re.compile(r"^[A-Za-z0-9.\-]{1,253}$")
_IPV6: Final = re.compile(r"^[0-9A-Fa-f:.]{2,45}$")
# The page is small and changes with the gateway: a browser asks again rather than run
# an old script against a newer API.
_NO_CACHE: Final = {"Cache-Control": "no-cache"}


@functools.cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def notifier_url(settings: Settings, request: Request) -> str:
    """The notifier's WebSocket URL as a browser that reached this gateway sees it:
    NOTIFIER_PUBLIC_URL, else the host the browser asked for on NOTIFIER_PORT."""
    if settings.notifier_public_url is not None:
        return settings.notifier_public_url
    host = request.url.hostname or ""
    if not _HOST_NAME.match(host):
        host = f"[{host}]" if ":" in host and _IPV6.match(host) else "localhost"
    scheme = "wss" if request.url.scheme == "https" else "ws"
    return f"{scheme}://{host}:{settings.notifier_port}/ws"


def _origin(url: str) -> str:
    """``ws://host:port`` of a WebSocket URL, for the page's Content-Security-Policy."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


@router.get("/")
async def page(request: Request, settings: SettingsDep) -> Response:
    # The page runs only its own script and talks only to this gateway and the notifier:
    # even if a drawing's text slipped into markup, no injected script could run.
    policy = "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self' {_origin(notifier_url(settings, request))}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return Response(
        _read("index.html"),
        media_type="text/html; charset=utf-8",
        headers={
            **_NO_CACHE,
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="not found")
    return Response(
        _read(name),
        media_type=media_type,
        headers={**_NO_CACHE, "X-Content-Type-Options": "nosniff"},
    )


@router.get("/config.json")
async def config(request: Request, settings: SettingsDep) -> JSONResponse:
    # no-store: the answer depends on the Host header, so no cache may share it.
    return JSONResponse(
        {"notifier_url": notifier_url(settings, request)}, headers={"Cache-Control": "no-store"}
    )
