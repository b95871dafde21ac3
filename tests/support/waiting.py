"""Waiting for something to happen across a process boundary: poll with a deadline,
never sleep-and-assert."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def eventually(
    condition: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = ...,
    what: str = ...,
    interval: float = ...,
) -> T: ...


@overload
async def eventually(
    condition: Callable[[], T | None],
    *,
    timeout: float = ...,
    what: str = ...,
    interval: float = ...,
) -> T: ...


async def eventually(
    condition: Callable[[], Any],
    *,
    timeout: float = 30.0,
    what: str = "condition",
    interval: float = 0.05,
) -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy, and return
    that; fail after ``timeout`` seconds saying ``what`` did not happen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)
