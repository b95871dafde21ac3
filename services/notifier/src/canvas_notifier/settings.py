"""The notifier's configuration, read from the environment (docs/settings.md)."""

from __future__ import annotations

from pydantic import Field

from canvas_events.settings import Port, ServiceSettings


class Settings(ServiceSettings):
    """Everything the notifier reads; built once at the edge and passed down."""

    notifier_port: Port = 8001
    # A client message (a WebSocket frame) over this closes the connection (1009, message
    # too big) before it is buffered whole (docs/settings.md).
    max_request_bytes: int = Field(default=65_536, ge=1_024, le=16 * 1024 * 1024)
    # Frames waiting for one connection; a client that lets more pile up is closed
    # (4008) so that it never holds memory or delays anyone else.
    ws_send_queue_size: int = Field(default=1000, ge=1, le=1_000_000)
    # Keepalive: a client that does not answer a ping within the timeout is dropped.
    ws_ping_interval_seconds: float = Field(default=20.0, gt=0, le=3600)
    ws_ping_timeout_seconds: float = Field(default=20.0, gt=0, le=3600)
    # Events replayed on one connect (`after`); a client further behind reconnects
    # (4009) from where the replay stopped.
    replay_limit: int = Field(default=10_000, ge=1, le=1_000_000)
    # How long a subscribe waits for a job or canvas to appear: a client that subscribes
    # right after its 202 may be ahead of the orchestrator's first commit.
    ws_subscribe_wait_seconds: float = Field(default=2.0, ge=0, le=30)
