"""The ai-generator's Prometheus metrics, in a registry of their own per service instance
(tests build several generators in one process). docs/operations.md#metrics-and-alerts
lists them; dashboards and alerts use these names."""

from __future__ import annotations

from canvas_events.ops import MetricSet
from canvas_generator.checks import SkipReason
from canvas_generator.errors import FailureKind

# Model calls take from a fraction of a second to about a minute.
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# From an object found in the stream to its confirm: milliseconds, seconds when slow.
_PUBLISH_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Metrics(MetricSet):
    """Every metric the ai-generator serves at /metrics; names start with ``canvas_``."""

    def __init__(self) -> None:
        super().__init__()
        self._add_attempt_metrics()
        self._add_model_metrics()
        self._show_every_label()

    def _add_attempt_metrics(self) -> None:
        """What became of the attempts taken from the work queue."""
        self.generation_attempt_seconds = self.histogram(
            "canvas_generation_attempt_seconds",
            "Duration of one attempt, from taking the work to publishing its result.",
            labels=["outcome"],
            buckets=_SECONDS,
        )
        self.generations_in_flight = self.gauge(
            "canvas_generations_in_flight",
            "Attempts this process is working on right now.",
        )
        self.generations_cancelled = self.counter(
            "canvas_generation_cancelled_total",
            "Attempts aborted during their model call because their job was cancelled.",
        )
        self.generations_adopted = self.counter(
            "canvas_generation_adopted_total",
            "Attempts handed out again (a connection blip) while this process still ran "
            "them: the run in hand was adopted, the model not called twice.",
        )
        self.generations_skipped = self.counter(
            "canvas_generation_skipped_total",
            "Attempts taken from the work queue and dropped before any model call, by reason.",
            labels=["reason"],
        )

    def _add_model_metrics(self) -> None:
        """The model calls, and the objects of their replies."""
        self.openai_request_seconds = self.histogram(
            "canvas_openai_request_seconds",
            "Duration of one chat completion call to the model, answered or not.",
            buckets=_SECONDS,
        )
        self.openai_errors = self.counter(
            "canvas_openai_errors_total",
            "Attempts that ended without a drawing, by failure kind.",
            labels=["kind"],
        )
        self.generated_objects = self.counter(
            "canvas_generated_objects_total",
            "Objects in model replies: valid ones kept, invalid ones dropped.",
            labels=["result"],
        )
        self.first_object_seconds = self.histogram(
            "canvas_generation_first_object_seconds",
            "From the start of a streamed model call to its first valid object.",
            buckets=_SECONDS,
        )
        self.progress_publish_seconds = self.histogram(
            "canvas_progress_publish_seconds",
            "From an object complete in the model's stream to its GenerationProgressed "
            "confirmed by the broker.",
            buckets=_PUBLISH_SECONDS,
        )
        self.budget_wait_seconds = self.histogram(
            "canvas_model_budget_wait_seconds",
            "How long an attempt waited for a permit of the fleet's model budget "
            "(MODEL_REQUESTS_PER_MINUTE, MODEL_TOKENS_PER_MINUTE) before its call.",
            buckets=_SECONDS,
        )

    def _show_every_label(self) -> None:
        """Every label value shows from the start (at 0), so that rate() and alerts work
        before the first failure."""
        for kind in FailureKind:
            self.openai_errors.labels(kind=kind.value)
        for outcome in ("succeeded", "failed", "cancelled"):
            self.generation_attempt_seconds.labels(outcome=outcome)
        for reason in SkipReason:
            self.generations_skipped.labels(reason=reason.value)
        for result in ("kept", "dropped"):
            self.generated_objects.labels(result=result)
