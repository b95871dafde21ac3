"""The WebSocket example of the README (`python -m tools.ws`), as a real process against
a real WebSocket server: the token travels in the header, never in the URL, and is
never printed."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ3cy10ZXN0In0.c2lnbmF0dXJlLW9mLXRoZS10ZXN0"
FRAME = '{"type": "ai_job_queued", "job_id": "j-1", "position": 7}'


@dataclass
class Notifier:
    """A stand-in notifier: records each handshake, sends FRAME, closes with ``code``."""

    port: int = 0
    code: int = 1000
    reason: str = ""
    seen: list[tuple[str, str | None]] = field(default_factory=list)

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.seen.append((ws.request.path, ws.request.headers.get("Authorization")))
        if self.code == 1000:
            await ws.send(FRAME)
        await ws.close(self.code, self.reason)


@pytest.fixture
async def notifier() -> AsyncIterator[Notifier]:
    fake = Notifier()
    async with serve(fake.handle, "127.0.0.1", 0) as server:
        fake.port = server.sockets[0].getsockname()[1]
        yield fake


async def run_example(notifier: Notifier, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.ws",
        "--url",
        f"ws://127.0.0.1:{notifier.port}/ws",
        *args,
        cwd=ROOT,
        env={**os.environ, "TOKEN": TOKEN},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_example_sends_the_token_in_the_header_and_never_prints_it(
    notifier: Notifier,
) -> None:
    code, out, err = await run_example(notifier, "--after", "5")

    assert code == 0, err
    assert out.splitlines() == [FRAME]
    assert notifier.seen == [("/ws?after=5", f"Bearer {TOKEN}")]
    assert TOKEN not in out + err
    assert f"connected to ws://127.0.0.1:{notifier.port}/ws?after=5" in err


async def test_the_example_says_why_the_notifier_closed(notifier: Notifier) -> None:
    notifier.code, notifier.reason = 4401, "token expired"

    code, out, err = await run_example(notifier)

    assert code == 1
    assert "closed 4401 token expired" in err
    assert TOKEN not in out + err
