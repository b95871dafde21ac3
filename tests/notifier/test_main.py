"""``canvas-notifier`` as a real process: settings, JSON logs, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import orjson
from websockets.asyncio.client import connect

from canvas_events.auth import mint_token
from canvas_events.topology import Topology
from tests.notifier import support
from tests.notifier.support import SECRET, closed_code, free_port

BIN = Path(sys.executable).parent / "canvas-notifier"


def environment(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "AMQP_URL")}
    env.update(values)
    return env


async def test_sigterm_closes_every_connection_with_1001_and_exits_cleanly(
    database_url: str, amqp_url: str, topology: Topology
):
    await support.apply_schema(database_url)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(BIN),
        env=environment(
            DATABASE_URL=database_url,
            AMQP_URL=amqp_url,
            AMQP_TOPOLOGY_PREFIX=topology.prefix,
            JWT_SECRET=SECRET,
            NOTIFIER_PORT=str(port),
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    token = mint_token("alice", SECRET)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(20):
                while True:
                    try:
                        if (await http.get("/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
        url = f"ws://127.0.0.1:{port}/ws?token="
        async with (
            connect(url + token) as first,
            connect(url + token) as second,
            connect(url + mint_token("bob", SECRET)) as third,
        ):
            async with asyncio.timeout(10):
                while True:
                    if await _connections(port) >= 3:
                        break
                    await asyncio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            codes = await asyncio.gather(*(closed_code(ws) for ws in (first, second, third)))
            assert codes == [1001, 1001, 1001]
        async with asyncio.timeout(20):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    lines = [orjson.loads(line) for line in stdout.splitlines() if line.strip()]
    assert all(line["service"] == "notifier" for line in lines)
    connected = [line for line in lines if line["event"] == "client connected"]
    assert connected
    assert connected[0]["user_id"] == "alice"
    assert any(line["event"] == "client disconnected" for line in lines)
    assert token not in stdout.decode()
    assert SECRET not in stdout.decode()


async def _connections(port: int) -> float:
    """The connection gauge: the handler has taken the connection once it is 1."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith("canvas_websocket_connections "):
            return float(line.split()[1])
    return 0.0


async def test_a_bad_setting_stops_the_process_with_exit_2_naming_the_variable():
    process = await asyncio.create_subprocess_exec(
        str(BIN),
        env=environment(WS_SEND_QUEUE_SIZE="zero"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"WS_SEND_QUEUE_SIZE" in stderr
