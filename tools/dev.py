"""`make dev`: the whole system on this machine, each service its own process, in the
foreground; Ctrl-C stops them all. A service that dies is started again after a back-off
(tools/supervisor.py), so the others, the page and the CLI show how they ride it out.

Uses the local PostgreSQL and RabbitMQ (DATABASE_URL / AMQP_URL, else the defaults),
creates the database when missing (the orchestrator applies its migrations at start),
and, without OPENAI_API_KEY, starts the offline stand-in model and says so loudly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from canvas_events.auth import mint_token
from canvas_events.postgres import ensure_database
from canvas_events.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, DEV_JWT_SECRET
from tools.supervisor import Supervisor, say

BIN = Path(sys.executable).parent
BANNER = "=" * 78


def wait_ready(name: str, url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dev: {name} exited with {proc.returncode}; see its log above")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:  # noqa: S310 (localhost)
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"dev: {name} not ready at {url} after {timeout:.0f}s")


def main() -> int:
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", DEFAULT_DATABASE_URL)
    env.setdefault("AMQP_URL", DEFAULT_AMQP_URL)
    env.setdefault("LOG_FORMAT", "json")
    # Development: without JWT_SECRET the services sign with the public development
    # secret (and say so); anywhere else they refuse to start without it.
    env.setdefault("CANVAS_ENV", "development")
    ports = {
        "gateway": int(env.setdefault("GATEWAY_PORT", "8000")),
        "notifier": int(env.setdefault("NOTIFIER_PORT", "8001")),
        "orchestrator": int(env.setdefault("ORCHESTRATOR_PORT", "8002")),
        "generator": int(env.setdefault("GENERATOR_PORT", "8003")),
    }
    # The generator asks the orchestrator whether an attempt is still wanted.
    env.setdefault("ORCHESTRATOR_URL", f"http://127.0.0.1:{ports['orchestrator']}")
    asyncio.run(ensure_database(env["DATABASE_URL"]))

    services: list[tuple[str, list[str], str]] = []
    if not env.get("OPENAI_API_KEY"):
        fake_port = int(env.setdefault("FAKE_OPENAI_PORT", "8090"))
        env["OPENAI_API_KEY"] = "sk-offline-stand-in"
        env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{fake_port}/v1"
        env.setdefault("FAKE_OPENAI_CHUNK_DELAY_MS", "40")
        # Asked by its own name, the stand-in answers as itself: no result, page or CLI
        # line says an OpenAI model drew what it made up.
        env.setdefault("OPENAI_MODEL", "canvas-stand-in")
        say(BANNER)
        say("OPENAI_API_KEY is not set: using the OFFLINE STAND-IN MODEL (canvas-fake-openai)")
        say(f"at {env['OPENAI_BASE_URL']}. Drawings are made up by it, not by OpenAI.")
        say("Set OPENAI_API_KEY (and OPENAI_BASE_URL for another server) to use a real model.")
        say(BANNER)
        services.append(
            ("fake-openai", ["canvas-fake-openai"], f"http://127.0.0.1:{fake_port}/health")
        )
    services += [
        (
            "orchestrator",
            ["canvas-orchestrator"],
            f"http://127.0.0.1:{ports['orchestrator']}/ready",
        ),
        ("generator", ["canvas-generator"], f"http://127.0.0.1:{ports['generator']}/ready"),
        ("notifier", ["canvas-notifier"], f"http://127.0.0.1:{ports['notifier']}/ready"),
        ("gateway", ["canvas-gateway"], f"http://127.0.0.1:{ports['gateway']}/ready"),
    ]

    supervisor = Supervisor(env)
    try:
        for name, command, ready in services:
            started = supervisor.start(name, [str(BIN / command[0]), *command[1:]])
            assert started.process is not None
            wait_ready(name, ready, started.process)
        _banner(env, ports)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        supervisor.run()
    except KeyboardInterrupt:
        say("\ndev: stopping")
        return 0
    finally:
        supervisor.stop()
    return 1  # not reached: run() returns only by an exception


def _banner(env: dict[str, str], ports: dict[str, int]) -> None:
    secret = env.get("JWT_SECRET") or DEV_JWT_SECRET
    token = mint_token("dev-user", secret)
    gateway = f"http://localhost:{ports['gateway']}"
    say(BANNER)
    say("canvas-jobs is up:")
    say(f"  open {gateway}/ and watch it draw (sign in with the token below)")
    say(f"  gateway   {gateway}  (OpenAPI: {gateway}/docs)")
    say(f"  notifier  ws://localhost:{ports['notifier']}/ws  (follow it: python -m tools.ws)")
    say(
        f"  orchestrator http://localhost:{ports['orchestrator']}/ready, "
        f"generator http://localhost:{ports['generator']}/ready"
    )
    say("  RabbitMQ management UI: http://localhost:15672 (guest/guest), if its plugin is on")
    say("")
    say("A development token (user dev-user, 7 days):")
    say(f"  export TOKEN={token}")
    say("Submit a job and follow it:")
    say(f"  curl -s -X POST {gateway}/api/ai-agent/create-canvas \\")
    say('       -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\')
    say("""       -d '{"query": "a flowchart of a login flow"}'""")
    say(f'  curl -s {gateway}/api/ai-agent/job/JOB_ID/status -H "Authorization: Bearer $TOKEN"')
    say("A service that exits is started again (1 s, then up to 30 s apart while it keeps")
    say("dying). Ctrl-C stops everything.")
    say(BANNER)


if __name__ == "__main__":
    raise SystemExit(main())
