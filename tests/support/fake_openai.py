"""The OpenAI-compatible stand-in (``canvas-fake-openai``) as a real process on a free
port, for tests: start it with env knobs, wait for /health, read its stats, stop it."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.processes import ServiceProcess, free_port


class FakeOpenAI:
    """One stand-in process. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, **knobs: str | int | float) -> None:
        """``knobs`` are FAKE_OPENAI_* settings without the prefix: ``require_key="sk-1"``."""
        self.port = free_port()
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
    def url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What OPENAI_BASE_URL should say."""
        return f"{self.url}/v1"

    def start(self, timeout: float = 20.0) -> FakeOpenAI:
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
                        return self
                if time.monotonic() > deadline:
                    raise AssertionError(f"canvas-fake-openai not up:\n{self.process.tail()}")
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it lingers) and remove its log."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.stop(timeout=10)
        self._log_dir.cleanup()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """``GET /_fake/stats``."""
        return dict(httpx.get(f"{self.url}/_fake/stats", timeout=5).json())

    def reset(self) -> None:
        """``DELETE /_fake/stats``: counters and recorded requests back to zero."""
        httpx.delete(f"{self.url}/_fake/stats", timeout=5).raise_for_status()

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """``PUT /_fake/config`` with the knobs given (lower-case names, no prefix)."""
        response = httpx.put(f"{self.url}/_fake/config", json=knobs, timeout=5)
        response.raise_for_status()
        return dict(response.json())

    def requests(self) -> list[dict[str, Any]]:
        """The last request bodies the stand-in received."""
        return list(httpx.get(f"{self.url}/_fake/requests", timeout=5).json())
