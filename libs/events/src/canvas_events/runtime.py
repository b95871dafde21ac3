"""Running a service process: the event loop, signals, and a uvicorn server inside it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("canvas_events.runtime")


def instance_id(service: str) -> str:
    """A name for this process, unique on the broker: host and pid."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on an event loop (uvloop when installed); SIGTERM and SIGINT
    set ``stop`` so that ``main`` can drain its work and return."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        import uvloop
    except ImportError:
        asyncio.run(runner())
    else:
        uvloop.run(runner())


async def serve_http(app: Any, port: int, stop: asyncio.Event, host: str = "0.0.0.0") -> None:
    """Serve an ASGI app with uvicorn until ``stop`` is set; the service, not uvicorn,
    decides when to stop."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    # uvicorn would take SIGTERM/SIGINT for itself and raise them again on exit.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(), name=f"http-{port}")
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        stopper.cancel()
        task.result()  # a server that could not bind: raise it
        return
    server.should_exit = True
    with contextlib.suppress(Exception):
        await task
