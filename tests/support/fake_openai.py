"""The OpenAI-compatible stand-in (``canvas-fake-openai``) for tests: its test controls
(``/_fake/...``) wherever it runs, and the stand-in as a real process on a free port of
its own: start it with env knobs, wait for /health, read its stats, stop it."""

from __future__ import annotations

import bisect
import contextlib
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.processes import LocalServer, ServiceProcess, free_port


class StandIn:
    """The test controls of the stand-in listening at ``url`` (canvas_fake_openai.server
    lists them): its counters, the requests it saw, its knobs, its gates."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, method: str, path: str, **request: Any) -> Any:
        answer = httpx.request(method, f"{self.url}/_fake/{path}", timeout=5, **request)
        answer.raise_for_status()
        return answer.json()

    def stats(self) -> dict[str, Any]:
        """``GET /_fake/stats``: ``calls``, ``in_flight``, ``abandoned``, ``failures``..."""
        return dict(self._call("GET", "stats"))

    def reset(self) -> None:
        """``DELETE /_fake/stats``: counters and recorded requests back to zero."""
        self._call("DELETE", "stats")

    def calls(self) -> dict[str, int]:
        """``GET /_fake/calls``: how often it was called with each prompt (user message)."""
        return dict(self._call("GET", "calls"))

    def requests(self) -> list[dict[str, Any]]:
        """The last request bodies the stand-in received."""
        return list(self._call("GET", "requests"))

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """``PUT /_fake/config`` with the knobs given (lower-case names, no prefix)."""
        return dict(self._call("PUT", "config", json=knobs))

    def open_gate(self, name: str) -> None:
        """Let the replies paused at gate ``name`` go on."""
        self._call("PUT", f"gates/{name}")

    def arrivals(self) -> list[float]:
        """When each chat call arrived (Unix seconds, oldest first)."""
        return sorted(self._call("GET", "call-times")["arrivals"])


def busiest_window(arrivals: list[float], seconds: float) -> int:
    """The most of ``arrivals`` (sorted) in any window of ``seconds``."""
    return max(
        (bisect.bisect_left(arrivals, start + seconds) - i for i, start in enumerate(arrivals)),
        default=0,
    )


class FakeOpenAI(LocalServer, StandIn):
    """One stand-in process. Use as a context manager, or ``setup()`` / ``cleanup()``."""

    def __init__(self, **knobs: str | int | float) -> None:
        """``knobs`` are FAKE_OPENAI_* settings without the prefix: ``require_key="sk-1"``."""
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self._log_dir = tempfile.TemporaryDirectory(prefix="fake-openai-")
        env = {f"FAKE_OPENAI_{name.upper()}": str(value) for name, value in knobs.items()}
        env |= {"FAKE_OPENAI_PORT": str(self.port), "FAKE_OPENAI_HOST": "127.0.0.1"}
        self.process = ServiceProcess(
            "fake-openai",
            ["canvas-fake-openai"],
            env,
            Path(self._log_dir.name),
            f"{self.url}/health",
        )

    @property
    def base_url(self) -> str:
        """What OPENAI_BASE_URL should say."""
        return f"{self.url}/v1"

    def setup(self, timeout: float = 20.0) -> None:
        """Start the process and wait until /health answers."""
        self.process.start()
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1) as client:
            while True:
                proc = self.process.process
                assert proc is not None
                if proc.poll() is not None:
                    raise AssertionError(
                        f"canvas-fake-openai exited with {proc.returncode}:\n{self.process.tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise AssertionError(f"canvas-fake-openai not up:\n{self.process.tail()}")
                time.sleep(0.05)

    def cleanup(self) -> None:
        """SIGTERM (SIGKILL if it lingers) and remove its log."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.stop(timeout=10)
        self._log_dir.cleanup()
