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


async def cancel_and_wait(*tasks: asyncio.Task[Any], every: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until each has ended, sending the cancel again every
    ``every`` seconds to a task still running.

    Once is not always enough: Python 3.11's ``asyncio.wait_for``, which aio-pika, aiormq
    and asyncpg await everywhere, loses a cancel that arrives just as the step it waits
    for completes, and the task goes on to its next await (a broker stopped mid-connect
    then waited on its new connection for good). A task's own error is logged, not
    raised: the caller is stopping it."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning(
                "ended with an error as it was stopped", task=task.get_name(), error=repr(error)
            )


class Background:
    """A loop a service runs beside its work (the relay, the timers, a sweep), the same
    way everywhere: :meth:`start` once; :meth:`run` watches :attr:`stopping` and returns
    when it is set, after what it has in hand; :meth:`stop` sets it and waits up to a
    timeout, then cancels the loop."""

    #: The task's name, and the log's for a loop that did not stop in time.
    name = "background"

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """The loop itself."""
        raise NotImplementedError

    async def start(self) -> None:
        """Start :meth:`run` in the background (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=self.name)

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to finish, wait for it up to ``timeout`` seconds, then cancel it."""
        self.stopping.set()
        self.stopping_now()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        if not done:
            log.warning("did not stop in time; cancelled", loop=self.name)
        await cancel_and_wait(self._task)

    def stopping_now(self) -> None:
        """Called as a stop begins: wake what the loop waits on besides :attr:`stopping`."""

    async def pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until a stop; True while the loop should go on."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return not self.stopping.is_set()

    async def unless_stopped(self, awaitable: Awaitable[object]) -> bool:
        """Wait for ``awaitable`` or for a stop, whichever comes first; True when the
        awaitable finished (a loop still waiting for the database must stop at once)."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stopping.wait())
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
