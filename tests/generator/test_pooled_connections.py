"""The model client's pooled HTTP connections against a server that closes idle ones, as
every HTTP server does after its keep-alive timeout (uvicorn, vLLM and the stand-in after
5 s): a real HTTP/1.1 server on a thread of the test, so that it closes a connection
while the client's event loop is busy elsewhere (as with 1,000 streams in flight), and
the client takes that connection from its pool before it has seen it closed.

A connection the server closed before it answered is never reported as a timeout.
"""

from __future__ import annotations

import http.server
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

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

    def do_POST(self) -> None:
        body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.server.arrived(self.connection_number, body):
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
    """Answers every chat call with one short reply, and hangs up on the calls numbered
    in ``hang_up_on`` (1 for the first call it receives) without answering them."""

    daemon_threads = True

    def __init__(self, hang_up_on: frozenset[int] = frozenset()) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hang_up_on = hang_up_on
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
    hang_up_on: frozenset[int] = getattr(request, "param", frozenset())
    running = KeepAliveServer(hang_up_on)
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


@pytest.mark.parametrize("server", [frozenset({1})], indirect=True)
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
