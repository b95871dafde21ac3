"""Follow your jobs' events from a terminal: `.venv/bin/python -m tools.ws [--after N]`.

The token comes from $TOKEN (or $CANVAS_TOKEN) and goes in the `Authorization` header,
never in the URL: a URL is what clients print ("Connected to ws://...?token=..."),
terminals scroll back and proxies log. Each frame is printed as one JSON line; the
close code and reason go to stderr. Exit 0 on a normal close or Ctrl-C, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from urllib.parse import parse_qs, urlencode, urlsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake


def _url(base: str, after: int | None) -> str:
    if "token" in parse_qs(urlsplit(base).query):
        raise SystemExit("ws: put the token in TOKEN, not in the URL")
    if after is None:
        return base
    return f"{base}{'&' if urlsplit(base).query else '?'}{urlencode({'after': after})}"


async def follow(url: str, token: str) -> int:
    """Print the frames of ``url`` until it closes; the exit code."""
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with connect(url, additional_headers=headers, compression=None) as ws:
            print(f"ws: connected to {url}", file=sys.stderr, flush=True)
            try:
                async for frame in ws:
                    print(frame if isinstance(frame, str) else frame.decode(), flush=True)
            except ConnectionClosed:
                pass
            code, reason = ws.close_code, ws.close_reason
    except (OSError, InvalidHandshake) as exc:
        print(f"ws: cannot connect to {url}: {exc}", file=sys.stderr)
        return 1
    print(f"ws: closed {code} {reason or ''}".rstrip(), file=sys.stderr)
    return 0 if code in (1000, 1001) else 1


def main() -> int:
    port = os.environ.get("NOTIFIER_PORT", "8001")
    parser = argparse.ArgumentParser(prog="python -m tools.ws", description=__doc__)
    parser.add_argument("--url", default=f"ws://localhost:{port}/ws", help="the notifier's /ws")
    parser.add_argument("--after", type=int, help="replay your events after this position")
    args = parser.parse_args()
    token = os.environ.get("TOKEN") or os.environ.get("CANVAS_TOKEN")
    if not token:
        print("ws: set TOKEN (make token prints one)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(follow(_url(args.url, args.after), token))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
