"""The notifier's Prometheus metrics, in a registry of their own per notifier (tests run
several in one process). docs/operations.md#metrics-and-alerts lists them; dashboards and
alerts use these names."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from canvas_events.ops import new_registry
from canvas_notifier.frames import STATUS_TYPES


class Metrics:
    """Every metric the notifier serves at /metrics; names start with ``canvas_``."""

    def __init__(self) -> None:
        self.registry = new_registry()
        self.connections = Gauge(
            "canvas_websocket_connections",
            "Open WebSocket connections (authenticated).",
            registry=self.registry,
        )
        self.messages_sent = Counter(
            "canvas_websocket_messages_sent_total",
            "Frames written to WebSocket connections, events and control frames.",
            registry=self.registry,
        )
        self.slow_client_closes = Counter(
            "canvas_websocket_slow_client_closes_total",
            "Connections closed with 4008 because their outbox filled up.",
            registry=self.registry,
        )
        self.replayed_events = Counter(
            "canvas_notifier_replayed_events_total",
            "Events read back from the event store for a connection (after=, broker reconnects).",
            registry=self.registry,
        )
        self.events_received = Counter(
            "canvas_notifier_events_total",
            "Recorded status events taken from the broker, by event type.",
            ["type"],
            registry=self.registry,
        )
        self.resyncs = Counter(
            "canvas_notifier_resyncs_total",
            "Times every connection replayed from the event store because the broker queue "
            "was new.",
            registry=self.registry,
        )
        # Every type shows from the start (at 0), so that rate() works before the first event.
        for event_type in STATUS_TYPES:
            self.events_received.labels(type=event_type)
