"""The model client's pooled HTTP connections against a server that closes idle ones, as
every HTTP server does after its keep-alive timeout (uvicorn, vLLM and the stand-in after
5 s): a real HTTP/1.1 server on a thread of the test, so that it closes a connection
while the client's event loop is busy elsewhere (as with 1,000 streams in flight), and
the client takes that connection from its pool before it has seen it closed.

A call sent on such a connection fails before any byte of the answer came back: the
server never saw it. It is sent again once, at once, on a fresh connection, and costs
the job neither an attempt nor a model call. A connection closed before the answer is
never reported as a timeout.
"""

from __future__ import annotations

import asyncio
import http.server
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog

from canvas_generator import connections
from canvas_generator.client import ModelClient
from canvas_generator.errors import AttemptFailed, FailureKind
from canvas_generator.prompt import build_messages

# The server closes a connection idle this long (uvicorn's keep-alive, shortened).
IDLE_SECONDS = 0.2
MODEL = "gpt-4o-mini"
TEXT = '{"objects": []}'


def _event(delta: dict[str, Any], finish_reason: str | None) -> bytes:
    chunk = {
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


STREAMED = (
    _event({"role": "assistant", "content": TEXT}, None) + _event({}, "stop") + b"data: [DONE]\n\n"
)
WHOLE = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": TEXT},
                "finish_reason": "stop",
            }
        ],
    }
)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = IDLE_SECONDS  # a connection idle this long is closed
    server: KeepAliveServer

    def setup(self) -> None:
        super().setup()
        self.connection_number = self.server.connected()
        self.calls_here = 0

    def do_POST(self) -> None:
        body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls_here += 1
        if self.server.arrived(self.connection_number, body) or (
            self.server.one_call_a_connection and self.calls_here > 1
        ):
            self.close_connection = True  # hang up without a word
            return
        reply, kind = (STREAMED, "text/event-stream") if body.get("stream") else (WHOLE, "")
        self.send_response(200)
        self.send_header("Content-Type", kind or "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class KeepAliveServer(http.server.ThreadingHTTPServer):
    """Answers every chat call with one short reply, and hangs up without answering on
    the calls numbered in ``hang_up_on`` (1 for the first call it receives), and with
    ``one_call_a_connection`` on every call but a connection's first (as when a server's
    keep-alive timeout ends as the next call arrives: the client cannot tell)."""

    daemon_threads = True

    def __init__(
        self, hang_up_on: frozenset[int] = frozenset(), *, one_call_a_connection: bool = False
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hang_up_on = hang_up_on
        self.one_call_a_connection = one_call_a_connection
        self._lock = threading.Lock()
        self.connections = 0
        # (connection number, request body) of each call received, in order.
        self.calls: list[tuple[int, dict[str, Any]]] = []
        self.closed: queue.Queue[None] = queue.Queue()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def connected(self) -> int:
        with self._lock:
            self.connections += 1
            return self.connections

    def arrived(self, connection: int, body: dict[str, Any]) -> bool:
        """Record a call; whether to hang up on it."""
        with self._lock:
            self.calls.append((connection, body))
            return len(self.calls) in self.hang_up_on

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        super().shutdown_request(request)
        self.closed.put(None)

    def wait_closed(self, count: int) -> None:
        """Block until ``count`` more connections were closed by the server. The caller's
        event loop waits too, so its HTTP client has not seen them close."""
        for _ in range(count):
            self.closed.get(timeout=10)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[KeepAliveServer]:
    options: dict[str, Any] = getattr(request, "param", {})
    running = KeepAliveServer(**options)
    thread = threading.Thread(target=running.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield running
    running.shutdown()
    running.server_close()
    thread.join(10)


def _client(server: KeepAliveServer, *, stream: bool) -> ModelClient:
    return ModelClient(
        api_key="sk-pooled-0123456789",
        base_url=server.base_url,
        model=MODEL,
        timeout_seconds=60,
        stream=stream,
    )


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_a_call_on_a_connection_the_server_closed_idle_is_sent_again_on_a_new_one(
    server: KeepAliveServer, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A logger of the test's own, first used under capture_logs (the module's may have
    # cached the process's configuration in an earlier test).
    monkeypatch.setattr(connections, "log", structlog.get_logger("canvas_generator.connections"))
    client = _client(server, stream=stream)
    try:
        first = await client.complete(build_messages("a flow"))
        server.wait_closed(1)
        with (
            structlog.testing.capture_logs(
                processors=[structlog.contextvars.merge_contextvars]
            ) as logs,
            structlog.contextvars.bound_contextvars(job_id="job-1", correlation_id="req-1"),
        ):
            second = await client.complete(build_messages("a second flow"))
    finally:
        await client.aclose()
    # The resend is said, in the attempt's log context (job_id, correlation_id).
    [resent] = [entry for entry in logs if entry["event"].startswith("call sent again")]
    assert (resent["job_id"], resent["correlation_id"]) == ("job-1", "req-1")
    assert (first.finish_reason, second.text, second.finish_reason) == ("stop", TEXT, "stop")
    # The call sent on the closed connection never reached the server; it was sent again
    # once, on a new connection, and answered.
    assert [connection for connection, _ in server.calls] == [1, 2]
    assert server.calls[1][1]["messages"] == build_messages("a second flow")


@pytest.mark.parametrize("server", [{"one_call_a_connection": True}], indirect=True)
async def test_a_call_is_sent_again_on_a_new_connection_not_another_pooled_one(
    server: KeepAliveServer,
) -> None:
    client = _client(server, stream=True)
    try:
        # Two calls at once: two connections in the pool, each closing as a call comes.
        await asyncio.gather(*(client.complete(build_messages("a flow")) for _ in "ab"))
        completion = await client.complete(build_messages("a second flow"))
    finally:
        await client.aclose()
    assert completion.finish_reason == "stop"
    connections = [connection for connection, _ in server.calls]
    assert sorted(connections[:2]) == [1, 2]
    # Hung up on, on a pooled connection; then answered on a new one.
    assert connections[2] in {1, 2}
    assert connections[3:] == [3]


@pytest.mark.parametrize("server", [{"hang_up_on": frozenset({1})}], indirect=True)
async def test_a_connection_closed_before_the_answer_is_a_connection_failure_not_a_timeout(
    server: KeepAliveServer,
) -> None:
    client = _client(server, stream=True)
    try:
        with pytest.raises(AttemptFailed) as caught:
            await client.complete(build_messages("a flow"))
    finally:
        await client.aclose()
    failure = caught.value
    assert (failure.kind, failure.retryable) == (FailureKind.CONNECTION, True)
    assert failure.message == (
        "OpenAI closed the connection before it answered (ServerDisconnectedError)"
    )
    # A new connection: the server may have begun on the call, so it is not sent again.
    assert len(server.calls) == 1


@pytest.mark.parametrize("server", [{"hang_up_on": frozenset({2})}], indirect=True)
async def test_a_call_is_sent_again_once_only(server: KeepAliveServer) -> None:
    client = _client(server, stream=True)
    try:
        await client.complete(build_messages("a flow"))
        server.wait_closed(1)
        with pytest.raises(AttemptFailed) as caught:
            await client.complete(build_messages("a second flow"))
    finally:
        await client.aclose()
    assert (caught.value.kind, caught.value.retryable) == (FailureKind.CONNECTION, True)
    assert "timeout" not in caught.value.message
    # Sent on the closed connection, then once on a new one, where the server hung up.
    assert [connection for connection, _ in server.calls] == [1, 2]
