"""The gateway's Prometheus metrics, in a registry of their own per app (so that a test
can build many apps in one process)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from canvas_events.ops import new_registry

# Seconds: most answers take a few milliseconds; a create waits for the broker's confirm.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric the gateway exports at /metrics; names start with ``canvas_``."""

    def __init__(self) -> None:
        self.registry = new_registry()
        self.http_requests = Counter(
            "canvas_http_requests_total",
            "HTTP requests answered, by route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "canvas_http_request_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.jobs_accepted = Counter(
            "canvas_jobs_accepted_total",
            "Jobs accepted (202) whose JobRequested the broker confirmed; duplicates excluded.",
            registry=self.registry,
        )
        self.jobs_rejected = Counter(
            "canvas_jobs_rejected_total",
            "Job requests refused after validation, by reason (limit, canvas, publish).",
            ["reason"],
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "canvas_publish_failures_total",
            "Messages the broker did not confirm (answered 503).",
            registry=self.registry,
        )
