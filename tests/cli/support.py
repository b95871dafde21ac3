"""Run ``canvas-jobs`` (the venv's console script) as a subprocess."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.system import System

CLI = Path(sys.executable).parent / "canvas-jobs"
# A safety net so that a hung command fails the test instead of blocking the suite;
# no assertion is made on how long a command takes.
DEADLINE = 90.0


@dataclass(frozen=True)
class Result:
    """How one run ended."""

    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def cli_env(system: System | None, token: str | None, **extra: str) -> dict[str, str]:
    """The environment of a run: the system's URLs and the token; nothing inherited
    that could point the CLI elsewhere (CANVAS_*, JWT_SECRET, COLUMNS)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CANVAS_") and k not in ("JWT_SECRET", "COLUMNS")
    }
    if system is not None:
        env["CANVAS_GATEWAY_URL"] = system.gateway_url
        env["CANVAS_NOTIFIER_URL"] = f"ws://127.0.0.1:{system.ports['notifier']}/ws"
    if token is not None:
        env["CANVAS_TOKEN"] = token
    env.update(extra)
    return env


async def start(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start ``canvas-jobs ARGS`` with stdout and stderr piped."""
    return await asyncio.create_subprocess_exec(
        str(CLI),
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> Result:
    """Wait for a started run to end."""
    try:
        async with asyncio.timeout(DEADLINE):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def run(*args: str, env: dict[str, str]) -> Result:
    """Run ``canvas-jobs ARGS`` to its end."""
    return await finish(await start(*args, env=env))
