"""The notifier's Prometheus metrics (ARCHITECTURE.md 9), on the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from canvas_notifier.frames import STATUS_TYPES

CONNECTIONS = Gauge(
    "canvas_websocket_connections",
    "Open WebSocket connections (authenticated).",
)
MESSAGES_SENT = Counter(
    "canvas_websocket_messages_sent_total",
    "Frames written to WebSocket connections, events and control frames.",
)
SLOW_CLIENT_CLOSES = Counter(
    "canvas_websocket_slow_client_closes_total",
    "Connections closed with 4008 because their outbox filled up.",
)
REPLAYED_EVENTS = Counter(
    "canvas_notifier_replayed_events_total",
    "Events read back from the event store for a connection (after=, broker reconnects).",
)
EVENTS_RECEIVED = Counter(
    "canvas_notifier_events_total",
    "Recorded status events taken from the broker, by event type.",
    ["type"],
)
RESYNCS = Counter(
    "canvas_notifier_resyncs_total",
    "Times every connection replayed from the event store because the broker queue was new.",
)

# Every type shows from the start (at 0), so that rate() works before the first event.
for _type in STATUS_TYPES:
    EVENTS_RECEIVED.labels(type=_type)
