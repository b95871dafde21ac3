"""The orchestrator's Prometheus metrics, on a registry of its own per service instance
(tests build several instances in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from canvas_events.ops import new_registry

# Model calls take seconds; a lease is minutes.
_ATTEMPT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 100)


class Metrics:
    """Every metric the orchestrator serves at /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.jobs = Counter(
            "canvas_jobs_total",
            "Jobs that reached each status (a retried job counts each time it is queued).",
            ["status"],
            registry=self.registry,
        )
        self.messages = Counter(
            "canvas_orchestrator_messages_total",
            "Messages consumed, by event type and outcome "
            "(recorded, ignored, duplicate, dead_lettered, retried).",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.batch_messages = Histogram(
            "canvas_orchestrator_batch_messages",
            "Messages of one job handled in one transaction.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.attempt_duration = Histogram(
            "canvas_attempt_duration_seconds",
            "From GenerationRequested to the attempt's recorded result.",
            ["outcome"],
            buckets=_ATTEMPT_BUCKETS,
            registry=self.registry,
        )
        self.timers = Counter(
            "canvas_orchestrator_timers_total",
            "Timers fired: retry_due (a job queued again), lease_expired (an attempt given up).",
            ["kind"],
            registry=self.registry,
        )
        self.outbox_lag = Gauge(
            "canvas_outbox_lag_events",
            "Recorded events not yet published by the relay (last position - checkpoint).",
            registry=self.registry,
        )
        self.outbox_published = Counter(
            "canvas_outbox_published_total",
            "Events the relay published with a broker confirm.",
            registry=self.registry,
        )
        self.relay_active = Gauge(
            "canvas_outbox_relay_active",
            "1 while this process holds the relay lock and publishes; 0 on standby.",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "canvas_queue_depth",
            "Messages ready in a queue, sampled at scrape.",
            ["queue"],
            registry=self.registry,
        )
        self.oldest_queued_age = Gauge(
            "canvas_queue_oldest_age_seconds",
            "How long the longest-waiting queued job has waited (0 when none), at scrape.",
            registry=self.registry,
        )
