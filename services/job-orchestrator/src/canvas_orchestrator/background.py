"""Helpers for the orchestrator's background loops (relay, timers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable


async def unless_stopped(awaitable: Awaitable[object], stopping: asyncio.Event) -> bool:
    """Wait for ``awaitable`` or for ``stopping``, whichever comes first; True when the
    awaitable finished (a loop still waiting for the database must stop at once)."""
    work = asyncio.ensure_future(awaitable)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, stop):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if work in done:
        work.result()
        return True
    return False
