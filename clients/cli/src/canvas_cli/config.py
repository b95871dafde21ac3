"""Where the system is and who speaks to it: options first, then the environment.

``CANVAS_GATEWAY_URL`` (default http://localhost:8000), ``CANVAS_NOTIFIER_URL`` (default
ws://localhost:8001/ws) and ``CANVAS_TOKEN``. The token is a secret: nothing here puts
it in a URL, a message or a ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from canvas_cli.errors import CliError

DEFAULT_GATEWAY_URL = "http://localhost:8000"
DEFAULT_NOTIFIER_URL = "ws://localhost:8001/ws"


@dataclass(frozen=True)
class Config:
    """The endpoints and the bearer token of one invocation."""

    gateway_url: str = DEFAULT_GATEWAY_URL
    notifier_url: str = DEFAULT_NOTIFIER_URL
    # repr=False: a traceback or a debug print of the config never shows it.
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        gateway = urlsplit(self.gateway_url)
        if gateway.scheme not in ("http", "https") or not gateway.netloc:
            raise CliError(
                f"the gateway URL must be http(s)://HOST[:PORT], not {self.gateway_url!r}",
                hint="set CANVAS_GATEWAY_URL or --gateway-url",
            )
        notifier = urlsplit(self.notifier_url)
        if notifier.scheme not in ("ws", "wss") or not notifier.netloc:
            raise CliError(
                f"the notifier URL must be ws(s)://HOST[:PORT]/ws, not {self.notifier_url!r}",
                hint="set CANVAS_NOTIFIER_URL or --notifier-url",
            )
        # No trailing slash: paths are appended as "/api/...".
        object.__setattr__(self, "gateway_url", self.gateway_url.rstrip("/"))

    def require_token(self) -> str:
        """The token, or a :class:`CliError` saying how to get one."""
        if not self.token:
            raise CliError(
                "no token: set CANVAS_TOKEN or pass --token",
                hint="a development token: canvas-jobs token --user NAME "
                "(with the system's JWT_SECRET)",
            )
        return self.token


def websocket_url(notifier_url: str, after: int | None = None) -> str:
    """The notifier URL with ``after`` set (or removed when None).

    The token travels in the Authorization header, never in this URL: URLs end up in
    error messages and proxy logs.
    """
    parts = urlsplit(notifier_url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("after", "token")]
    if after is not None:
        query.append(("after", str(after)))
    return urlunsplit(parts._replace(query=urlencode(query)))
