"""The ai-generator's Prometheus metrics (ARCHITECTURE.md 9), on the default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from canvas_generator.checks import SkipReason
from canvas_generator.errors import FailureKind

# Model calls take from a fraction of a second to about a minute.
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

OPENAI_REQUEST_SECONDS = Histogram(
    "canvas_openai_request_seconds",
    "Duration of one chat completion call to the model, answered or not.",
    buckets=_SECONDS,
)
OPENAI_ERRORS = Counter(
    "canvas_openai_errors_total",
    "Attempts that ended without a drawing, by failure kind.",
    ["kind"],
)
GENERATION_ATTEMPT_SECONDS = Histogram(
    "canvas_generation_attempt_seconds",
    "Duration of one attempt, from taking the work to publishing its result.",
    ["outcome"],
    buckets=_SECONDS,
)
GENERATIONS_IN_FLIGHT = Gauge(
    "canvas_generations_in_flight",
    "Attempts this process is working on right now.",
)
GENERATIONS_CANCELLED = Counter(
    "canvas_generation_cancelled_total",
    "Attempts aborted during their model call because their job was cancelled.",
)
GENERATIONS_ADOPTED = Counter(
    "canvas_generation_adopted_total",
    "Attempts handed out again (a connection blip) while this process still ran them: "
    "the run in hand was adopted, the model not called twice.",
)
GENERATIONS_SKIPPED = Counter(
    "canvas_generation_skipped_total",
    "Attempts taken from the work queue and dropped before any model call, by reason.",
    ["reason"],
)
GENERATED_OBJECTS = Counter(
    "canvas_generated_objects_total",
    "Objects in model replies: valid ones kept, invalid ones dropped.",
    ["result"],
)
PROGRESS_PUBLISH_SECONDS = Histogram(
    "canvas_progress_publish_seconds",
    "From an object complete in the model's stream to its GenerationProgressed confirmed "
    "by the broker.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
FIRST_OBJECT_SECONDS = Histogram(
    "canvas_generation_first_object_seconds",
    "From the start of a streamed model call to its first valid object.",
    buckets=_SECONDS,
)

# Every kind shows from the start (at 0), so that rate() and alerts work before the
# first failure.
for _kind in FailureKind:
    OPENAI_ERRORS.labels(kind=_kind.value)
for _outcome in ("succeeded", "failed", "cancelled"):
    GENERATION_ATTEMPT_SECONDS.labels(outcome=_outcome)
for _reason in SkipReason:
    GENERATIONS_SKIPPED.labels(reason=_reason.value)
for _result in ("kept", "dropped"):
    GENERATED_OBJECTS.labels(result=_result)
