"""The orchestrator's Prometheus metrics, on a registry of its own per service instance
(tests build several instances in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from canvas_events.ops import MetricSet

# Users labelled in canvas_unfinished_jobs_top_users.
BUSIEST_USERS = 10
# Model calls take seconds; a lease is minutes.
_ATTEMPT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 100)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)


class Metrics(MetricSet):
    """Every metric the orchestrator serves at /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.jobs = self.counter(
            "canvas_jobs_total",
            "Jobs that reached each status (a retried job counts each time it is queued).",
            labels=["status"],
        )
        self.messages = self.counter(
            "canvas_orchestrator_messages_total",
            "Messages consumed, by event type and outcome "
            "(recorded, ignored, duplicate, dead_lettered, retried).",
            labels=["type", "outcome"],
        )
        self.batch_messages = self.histogram(
            "canvas_orchestrator_batch_messages",
            "Messages of one job handled in one transaction.",
            buckets=_BATCH_BUCKETS,
        )
        self.append_commit = self.histogram(
            "canvas_orchestrator_append_commit_seconds",
            "From a transaction's append to its commit: the commit's share of recording.",
            buckets=_COMMIT_BUCKETS,
        )
        self.attempt_duration = self.histogram(
            "canvas_attempt_duration_seconds",
            "From GenerationRequested to the attempt's recorded result.",
            labels=["outcome"],
            buckets=_ATTEMPT_BUCKETS,
        )
        self.timers = self.counter(
            "canvas_orchestrator_timers_total",
            "Timers fired: retry_due (a job queued again), lease_expired (an attempt given up).",
            labels=["kind"],
        )
        self.outbox_lag = self.gauge(
            "canvas_outbox_lag_events",
            "Recorded events not yet published by the relay (those after its checkpoint).",
        )
        self.outbox_published = self.counter(
            "canvas_outbox_published_total",
            "Events the relay published with a broker confirm.",
        )
        self.relay_active = self.gauge(
            "canvas_outbox_relay_active",
            "1 while this process holds the relay lock and publishes; 0 on standby.",
        )
        self.queue_depth = self.gauge(
            "canvas_queue_depth",
            "Messages ready in a queue, sampled at scrape.",
            labels=["queue"],
        )
        self.oldest_queued_age = self.gauge(
            "canvas_queue_oldest_age_seconds",
            "How long the longest-waiting queued job has waited (0 when none), at scrape.",
        )
        self._add_budget_metrics()
        self._add_dispatch_metrics()

    def _add_dispatch_metrics(self) -> None:
        self.dispatch_waiting = self.gauge(
            "canvas_dispatch_waiting_jobs",
            "Queued jobs awaiting dispatch (not handed to the generators yet), as the last "
            "dispatch round saw them.",
        )
        self.fleet_capacity = self.gauge(
            "canvas_fleet_capacity",
            "Attempts the generators announced they can run at once (0: none announced).",
        )
        self.attempts_in_flight = self.gauge(
            "canvas_attempts_in_flight",
            "Attempts dispatched and not ended, as the last dispatch round saw them.",
        )
        self.dispatch_rounds = self.counter(
            "canvas_dispatch_rounds_total",
            "Dispatch rounds that handed out attempts (this process held the round's lock).",
        )

    def _add_budget_metrics(self) -> None:
        self.unfinished_by_user = self.gauge(
            "canvas_unfinished_jobs_top_users",
            f"Unfinished jobs of the {BUSIEST_USERS} users with the most, sampled at scrape "
            "(only those users are labelled: the label set stays small).",
            labels=["user"],
        )
        self.model_permits = self.counter(
            "canvas_model_permits_total",
            "Answers to generators asking to call the model under the fleet's budget: "
            "granted, or refused for requests, tokens or paused (a 429's pause).",
            labels=["outcome"],
        )
        self.model_pauses = self.counter(
            "canvas_model_pauses_total",
            "Pauses of the fleet's calls to a model that a 429 with Retry-After asked for.",
        )
