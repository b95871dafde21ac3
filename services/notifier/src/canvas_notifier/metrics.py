"""The notifier's Prometheus metrics, in a registry of their own per notifier (tests run
several in one process). docs/operations.md#metrics-and-alerts lists them; dashboards and
alerts use these names."""

from __future__ import annotations

from canvas_events.ops import MetricSet
from canvas_notifier.frames import STATUS_TYPES


class Metrics(MetricSet):
    """Every metric the notifier serves at /metrics; names start with ``canvas_``."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = self.gauge(
            "canvas_websocket_connections",
            "Open WebSocket connections (authenticated).",
        )
        self.messages_sent = self.counter(
            "canvas_websocket_messages_sent_total",
            "Frames written to WebSocket connections, events and control frames.",
        )
        self.slow_client_closes = self.counter(
            "canvas_websocket_slow_client_closes_total",
            "Connections closed with 4008 because their outbox filled up.",
        )
        self.replayed_events = self.counter(
            "canvas_notifier_replayed_events_total",
            "Events read back from the event store for a connection (after=, broker reconnects).",
        )
        self.events_received = self.counter(
            "canvas_notifier_events_total",
            "Recorded status events taken from the broker, by event type.",
            labels=["type"],
        )
        self.resyncs = self.counter(
            "canvas_notifier_resyncs_total",
            "Times every connection replayed from the event store because the broker queue "
            "was new.",
        )
        # Every type shows from the start (at 0), so that rate() works before the first event.
        for event_type in STATUS_TYPES:
            self.events_received.labels(type=event_type)
