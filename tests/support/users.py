"""One user of a running system (tests/support/system.py), as a browser or the CLI is:
the gateway's REST API (docs/api.md) over HTTP, and the notifier's frames over a
WebSocket. A call asserts the answer it must give (202, 200); :meth:`User.post` and
:attr:`User.http` are there for the answers a test looks at itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, Self

import httpx
import websockets

from tests.support.system import System
from tests.support.waiting import eventually

# The frames after which the notifier sends nothing more about a job.
FINAL_FRAMES = frozenset({"ai_generation_completed", "ai_job_cancelled"})


def is_final(frame: dict[str, Any]) -> bool:
    """Whether ``frame`` is the last the notifier sends about its job (an error is, once
    no retry follows it)."""
    if frame["type"] == "ai_job_error":
        return bool(frame["data"].get("final"))
    return frame["type"] in FINAL_FRAMES


class Submitted(NamedTuple):
    """A job the gateway accepted (202)."""

    job_id: str
    canvas_id: str

    @classmethod
    def of(cls, answer: httpx.Response) -> Submitted:
        """The job a 202 answer names."""
        body = answer.json()
        return cls(str(body["job_id"]), str(body["canvas_id"]))


class Socket:
    """One WebSocket connection of a user, recording every frame it receives."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            async for raw in self.ws:
                self.frames.append(json.loads(raw))

    def of(self, job_id: str, *types: str) -> list[dict[str, Any]]:
        """The job's frames so far (of those types, when given)."""
        return [
            f
            for f in self.frames
            if f.get("job_id") == job_id and (not types or f["type"] in types)
        ]

    async def until(
        self, job_id: str, frame_type: str, count: int = 1, *, timeout: float = 30
    ) -> list[dict[str, Any]]:
        """This job's frames up to and with the ``count``-th one of ``frame_type``."""

        def arrived() -> list[dict[str, Any]] | None:
            frames = self.of(job_id)
            hits = [i for i, f in enumerate(frames) if f["type"] == frame_type]
            return frames[: hits[count - 1] + 1] if len(hits) >= count else None

        what = f"{frame_type} of {job_id}"
        return list(await eventually(arrived, timeout=timeout, what=what))

    async def until_final(self, job_id: str, *, timeout: float = 30) -> list[dict[str, Any]]:
        """This job's frames up to and with its final one (:func:`is_final`)."""

        def arrived() -> list[dict[str, Any]] | None:
            frames = self.of(job_id)
            ends = [i for i, f in enumerate(frames) if is_final(f)]
            return frames[: ends[0] + 1] if ends else None

        what = f"the final frame of {job_id}"
        return list(await eventually(arrived, timeout=timeout, what=what))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class User:
    """A user of the running system (a new one unless ``name`` is given), talking to
    gateway process ``gateway``; use ``async with``."""

    def __init__(
        self, system: System, name: str | None = None, *, gateway: str = "gateway"
    ) -> None:
        self.system = system
        self.name = name or f"user-{uuid.uuid4().hex[:8]}"
        self.token = system.token(self.name)
        self.http = httpx.AsyncClient(
            base_url=system.url(gateway),
            timeout=10,
            headers={"Authorization": f"Bearer {self.token}"},
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.http.aclose()

    @contextlib.asynccontextmanager
    async def socket(
        self, after: int | None = None, *, notifier: str = "notifier"
    ) -> AsyncIterator[Socket]:
        """A WebSocket of this user to notifier process ``notifier``, for the block."""
        url = self.system.websocket_url(self.token, after, notifier=notifier)
        async with websockets.connect(url) as ws:
            socket = Socket(ws)
            try:
                yield socket
            finally:
                await socket.close()

    async def post(
        self, query: str, *, priority: int | None = None, key: str | None = None
    ) -> httpx.Response:
        """``POST /create-canvas`` (``key``: its Idempotency-Key), whatever it answers."""
        body: dict[str, Any] = {"query": query}
        if priority is not None:
            body["priority"] = priority
        headers = {"Idempotency-Key": key} if key else {}
        return await self.http.post("/api/ai-agent/create-canvas", json=body, headers=headers)

    async def submit(self, query: str, *, priority: int | None = None) -> Submitted:
        """A new job, on a canvas of its own: the gateway must accept it."""
        answer = await self.post(query, priority=priority)
        assert answer.status_code == 202, answer.text
        return Submitted.of(answer)

    async def status(self, job_id: str) -> dict[str, Any]:
        """``GET /job/{id}/status``."""
        answer = await self.http.get(f"/api/ai-agent/job/{job_id}/status")
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    async def until_status(
        self, job_id: str, *statuses: str, timeout: float = 30
    ) -> dict[str, Any]:
        """The job's status answer, once its status is one of ``statuses``."""

        async def reached() -> dict[str, Any] | None:
            status = await self.status(job_id)
            return status if status["status"] in statuses else None

        return dict(await eventually(reached, timeout=timeout, what=f"{job_id} in {statuses}"))

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's stream, as ``GET /job/{id}/events`` gives it."""
        answer = await self.http.get(f"/api/ai-agent/job/{job_id}/events")
        assert answer.status_code == 200, answer.text
        return list(answer.json()["events"])

    async def cancel(self, job_id: str) -> httpx.Response:
        """``POST /job/{id}/cancel``, whatever it answers."""
        return await self.http.post(f"/api/ai-agent/job/{job_id}/cancel")

    async def objects(self, canvas_id: str) -> list[dict[str, Any]]:
        """The canvas's objects, as ``GET /api/canvas/{id}/objects`` gives them."""
        answer = await self.http.get(f"/api/canvas/{canvas_id}/objects")
        assert answer.status_code == 200, answer.text
        return list(answer.json()["objects"])
