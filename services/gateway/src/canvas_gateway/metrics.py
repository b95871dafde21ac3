"""The gateway's Prometheus metrics, in a registry of their own per app (so that a test
can build many apps in one process)."""

from __future__ import annotations

from canvas_events.ops import MetricSet

# Seconds: most answers take a few milliseconds; a create waits for the broker's confirm.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics(MetricSet):
    """Every metric the gateway exports at /metrics; names start with ``canvas_``."""

    def __init__(self) -> None:
        super().__init__()
        self.http_requests = self.counter(
            "canvas_http_requests_total",
            "HTTP requests answered, by route template and status code.",
            labels=["method", "route", "status"],
        )
        self.http_seconds = self.histogram(
            "canvas_http_request_seconds",
            "Time to answer an HTTP request, by route template.",
            labels=["route"],
            buckets=_BUCKETS,
        )
        self.jobs_accepted = self.counter(
            "canvas_jobs_accepted_total",
            "Jobs accepted (202) whose JobRequested the broker confirmed; duplicates excluded.",
        )
        self.jobs_rejected = self.counter(
            "canvas_jobs_rejected_total",
            "Job requests refused after validation, by reason (limit: too many unfinished "
            "jobs; budget: the daily token budget used; canvas; publish).",
            labels=["reason"],
        )
        self.publish_failures = self.counter(
            "canvas_publish_failures_total",
            "Messages the broker did not confirm (answered 503).",
        )
