"""Traces (docs/operations.md, "Traces"): OpenTelemetry spans, off unless ``OTEL_*``
asks for them, and one trace per job across the four services.

Off (no ``OTEL_TRACES_EXPORTER`` or OTLP endpoint set, or ``OTEL_SDK_DISABLED=true``),
no provider is installed and every helper here returns at its first line: no span, no
header, no context switch. On, :func:`configure_tracing` installs the SDK's provider
with the exporters ``OTEL_TRACES_EXPORTER`` names (``otlp`` over HTTP/protobuf by
default, ``console`` to stderr); the SDK itself reads the rest of the standard
variables (sampler, batch processor, endpoint, headers, timeouts, resource).

A message carries the W3C ``traceparent`` of its publish span in its AMQP headers (the
envelope is the contract and stays as it is); a batch, whose events may belong to as
many jobs, carries one per event, in order, in ``x-canvas-traceparents``. Each event
consumed gets a span of its own, the child of its own publish span, so that a job's
spans stay in the job's trace whatever travelled with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from canvas_events.logging import redact

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from canvas_events.envelope import Envelope

TRACEPARENT: Final = "traceparent"
# A batch's traceparents, one per event in the order of its body ("" for none).
BATCH_TRACEPARENTS: Final = "x-canvas-traceparents"
# The instrumentation scope of every span here.
SCOPE: Final = "canvas-jobs"

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_ON: Final = {"true", "1", "yes"}
# The tracer of this process; None while tracing is off (the test helpers set it too).
_tracer: Tracer | None = None


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` asks for traces: an exporter named (other than ``none``), or an
    OTLP endpoint given; never with ``OTEL_SDK_DISABLED=true``."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _ON:
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return any(
        environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(
    service: str, environ: Mapping[str, str] = os.environ
) -> TracerProvider | None:
    """Install the SDK's tracer provider for ``service`` (the ``service.name`` resource
    attribute unless OTEL_SERVICE_NAME says otherwise) when ``environ`` asks for traces;
    None, and nothing installed, when it does not. A bad exporter setting stops the
    process with exit code 2, naming the variable, as a bad setting does."""
    global _tracer
    if not wanted(environ):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from canvas_events.runtime import instance_id

    attributes = {"service.instance.id": instance_id(service)}
    if not environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer(SCOPE)
    return provider


def exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters OTEL_TRACES_EXPORTER names (``otlp`` when only an endpoint is set)."""
    names = [
        name.strip().lower()
        for name in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")
        if name.strip() and name.strip().lower() != "none"
    ]
    return [_exporter(name, environ) for name in names]


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter
    from opentelemetry.util._importlib_metadata import entry_points

    if name == "otlp":
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        if protocol.strip().lower() != "http/protobuf":
            _refuse("OTEL_EXPORTER_OTLP_PROTOCOL", "only http/protobuf is installed")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        # stderr, a span a line: stdout holds the JSON logs alone.
        return ConsoleSpanExporter(out=sys.stderr, formatter=_one_line)
    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        _refuse("OTEL_TRACES_EXPORTER", f"no span exporter named {name!r} is installed")
    exporter: SpanExporter = found[0].load()()
    return exporter


def _one_line(span: Any) -> str:
    return str(span.to_json(indent=None)) + "\n"


def _refuse(variable: str, why: str) -> NoReturn:
    print(f"{sys.argv[0]}: invalid setting {variable}: {why}", file=sys.stderr)
    raise SystemExit(2)


def enabled() -> bool:
    """Whether spans are being recorded in this process."""
    return _tracer is not None


def use(tracer: Tracer | None) -> Tracer | None:
    """Record spans with ``tracer`` from now on (None: stop); the tracer used before. For
    tests (:func:`canvas_events.testing.recorded_spans`): no global provider is touched."""
    global _tracer
    before, _tracer = _tracer, tracer
    return before


# -- spans ----------------------------------------------------------------------------

T = TypeVar("T")


class _Off(Generic[T]):
    """What a helper below gives while tracing is off: a block entered and left at the
    cost of two calls (no generator, no context switch), yielding ``value``."""

    def __init__(self, value: T) -> None:
        self.value = value

    def __enter__(self) -> T:
        return self.value

    def __exit__(self, *_: object) -> None:
        return None


_NO_SPAN: Final = _Off[Span](INVALID_SPAN)
_NO_TRACEPARENTS: Final = _Off[Sequence[str | None]](())


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: str | None = None,
    root: bool = False,
    links: Iterable[str | None] = (),
    attributes: Mapping[str, Any] | None = None,
) -> AbstractContextManager[Span]:
    """A span around the block, made current within it: the child of ``parent`` (a
    traceparent) when given, else a new trace's root with ``root``, else the child of
    the current span. An error that leaves the block marks it failed, with its type and
    its redacted message (never a traceback: it may hold what a log line may not)."""
    if _tracer is None:
        return _NO_SPAN
    return _span(_tracer, name, kind, parent, root, links, attributes)


@contextlib.contextmanager
def _span(
    tracer: Tracer,
    name: str,
    kind: SpanKind,
    parent: str | None,
    root: bool,
    links: Iterable[str | None],
    attributes: Mapping[str, Any] | None,
) -> Iterator[Span]:
    context = _context(parent) if parent else (Context() if root else None)
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        links=_links(links),
        attributes=_attributes(attributes),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except Exception as exc:
            failed(current, exc)
            raise
        except asyncio.CancelledError:
            current.set_attribute("canvas.cancelled", True)
            raise


def failed(current: Span, exc: BaseException | str) -> None:
    """Mark ``current`` failed by ``exc`` (an error, or what went wrong, in words)."""
    if isinstance(exc, BaseException):
        current.set_attribute("error.type", type(exc).__name__)
        exc = str(exc)
    current.set_status(StatusCode.ERROR, redact(exc)[:500])


def current_traceparent() -> str | None:
    """The traceparent of the current span (None when there is none, or tracing is off):
    what work handed to another task carries to stay in this trace."""
    if _tracer is None:
        return None
    return traceparent_of(trace.get_current_span())


def traceparent_of(current: Span) -> str | None:
    """``current``'s W3C traceparent (None for a span that is not valid)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(current))
    return carrier.get(TRACEPARENT)


def job_attributes(envelope: Envelope) -> dict[str, Any]:
    """The attributes that find a job's spans: job, correlation id, event type."""
    return {
        "canvas.job_id": str(envelope.job_id) if envelope.job_id else None,
        "canvas.correlation_id": envelope.correlation_id,
        "canvas.event_type": envelope.type,
    }


def _context(traceparent: str) -> Context:
    return _PROPAGATOR.extract({TRACEPARENT: traceparent}, context=Context())


def _links(traceparents: Iterable[str | None]) -> list[Link]:
    links = []
    for traceparent in traceparents:
        if traceparent:
            context = trace.get_current_span(_context(traceparent)).get_span_context()
            if context.is_valid:
                links.append(Link(context))
    return links


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    # None is no attribute value: left out rather than warned about.
    if attributes is None:
        return None
    return {key: value for key, value in attributes.items() if value is not None}


# -- messages -------------------------------------------------------------------------


def publishing(
    envelopes: Sequence[Envelope], routing_key: str, parents: Sequence[str | None] = ()
) -> AbstractContextManager[Sequence[str | None]]:
    """A publish span per envelope for the block that publishes them (one message, or a
    batch), each the child of its ``parents`` entry when given, else of the current
    span; yields their traceparents, for the message's headers (:func:`headers_of`)."""
    if _tracer is None:
        return _NO_TRACEPARENTS
    return _publishing(_tracer, envelopes, routing_key, parents)


@contextlib.contextmanager
def _publishing(
    tracer: Tracer, envelopes: Sequence[Envelope], routing_key: str, parents: Sequence[str | None]
) -> Iterator[Sequence[str | None]]:
    spans = []
    for number, envelope in enumerate(envelopes):
        parent = parents[number] if number < len(parents) else None
        context = _context(parent) if parent else None
        attributes = {
            **job_attributes(envelope),
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.message.id": str(envelope.event_id),
            "messaging.rabbitmq.destination.routing_key": routing_key,
            "messaging.batch.message_count": len(envelopes) if len(envelopes) > 1 else None,
        }
        spans.append(
            tracer.start_span(
                f"publish {envelope.type}",
                context=context,
                kind=SpanKind.PRODUCER,
                attributes=_attributes(attributes),
            )
        )
    try:
        yield [traceparent_of(item) for item in spans]
    except Exception as exc:
        for item in spans:
            failed(item, exc)
        raise
    finally:
        for item in spans:
            item.end()


def headers_of(traceparents: Sequence[str | None]) -> dict[str, Any] | None:
    """The AMQP headers that carry ``traceparents``: one message's ``traceparent``, or a
    batch's ``x-canvas-traceparents``; None when there is nothing to carry."""
    if not traceparents or not any(traceparents):
        return None
    if len(traceparents) == 1:
        return {TRACEPARENT: traceparents[0]}
    return {BATCH_TRACEPARENTS: [value or "" for value in traceparents]}


def parent_in(headers: Mapping[str, Any] | None, index: int | None = None) -> str | None:
    """The traceparent a message's ``headers`` carry: its own, or with ``index`` that of
    the batch's event at ``index``; None when absent or not a string."""
    if not headers:
        return None
    if index is None:
        value = headers.get(TRACEPARENT)
    else:
        values = headers.get(BATCH_TRACEPARENTS)
        value = values[index] if isinstance(values, list) and index < len(values) else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value if isinstance(value, str) and value else None


def part_headers(headers: Mapping[str, Any] | None, traceparent: str | None) -> dict[str, Any]:
    """The headers of a message that carries one event of a batch on its own (a dead
    letter, a retry): the batch's, with that event's traceparent instead of the batch's
    list."""
    kept = {key: value for key, value in (headers or {}).items() if key != BATCH_TRACEPARENTS}
    kept.pop(TRACEPARENT, None)
    return {**kept, TRACEPARENT: traceparent} if traceparent else kept


def consuming(envelope: Envelope, queue: str, parent: str | None) -> AbstractContextManager[Span]:
    """The span of one consumed event, current while its handler runs: the child of its
    publish span (``parent``), or a new trace's root when the message carried none."""
    if _tracer is None:
        return _NO_SPAN
    attributes = {
        **job_attributes(envelope),
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.message.id": str(envelope.event_id),
        "messaging.destination.name": queue,
        "canvas.queue": queue,
    }
    name = f"process {envelope.type}"
    return _span(_tracer, name, SpanKind.CONSUMER, parent, True, (), attributes)


def add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` of the current span, if any."""
    if _tracer is None:
        return event
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event
