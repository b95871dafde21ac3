"""Traces (docs/operations.md, "Traces"): off without OTEL_*, and when on, a message's
trace travels in its AMQP headers, a batch's events each in their own, on the real
RabbitMQ and in memory (spans kept by the SDK's in-memory exporter)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence

import pytest
import structlog
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.trace import SpanKind

from canvas_events import tracing
from canvas_events.broker import ACK, Outcome, Retry
from canvas_events.envelope import Envelope
from canvas_events.logging import configure_logging
from canvas_events.publishing import BatchPublisher
from canvas_events.testing import InMemoryBroker, recorded_spans
from canvas_events.topology import BATCH, GATEWAY, Topology, routing_key
from tests.events.brokers import KEY, Brokers
from tests.events.memory import job_requested

BATCH_KEY = routing_key(GATEWAY, BATCH)


class Seen:
    """Acks each event (a retry first for those in ``retry_once``) and keeps, per
    delivery, the event, the message and the traceparent current in its handler."""

    def __init__(self) -> None:
        self.seen: list[tuple[Envelope, AbstractIncomingMessage, str | None]] = []
        self.retry_once: set[str] = set()
        self.arrived = asyncio.Condition()

    async def __call__(self, envelope: Envelope, message: AbstractIncomingMessage) -> Outcome:
        async with self.arrived:
            self.seen.append((envelope, message, tracing.current_traceparent()))
            self.arrived.notify_all()
        if str(envelope.event_id) in self.retry_once:
            self.retry_once.discard(str(envelope.event_id))
            return Retry("not yet", delay=0.05)
        return ACK

    async def wait_for(self, count: int) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.seen) >= count), 10)


def _ids(span: ReadableSpan) -> tuple[int, int]:
    return span.context.trace_id, span.context.span_id


def _parent(span: ReadableSpan) -> tuple[int, int] | None:
    return (span.parent.trace_id, span.parent.span_id) if span.parent is not None else None


def _named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def _in(traceparent: object) -> tuple[int, int]:
    """The (trace id, span id) a traceparent names (its flags aside)."""
    assert isinstance(traceparent, str), traceparent
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def _finished(exporter: object, count: int) -> list[ReadableSpan]:
    """The finished spans once there are ``count`` of them (spans end a moment after the
    handler that a test waits for returns)."""
    for _ in range(200):
        spans = list(exporter.get_finished_spans())  # type: ignore[attr-defined]
        if len(spans) >= count:
            return spans
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(spans)} spans, not {count}: {[s.name for s in spans]}")


# -- off --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ],
)
def test_traces_are_on_only_when_otel_variables_ask_for_them(
    environ: dict[str, str], wanted: bool
) -> None:
    assert tracing.wanted(environ) is wanted


def test_with_no_otel_variable_no_provider_is_installed() -> None:
    assert tracing.configure_tracing("gateway", environ={}) is None
    assert not tracing.enabled()
    assert not isinstance(trace.get_tracer_provider(), SdkTracerProvider)
    assert tracing.current_traceparent() is None
    with tracing.span("nothing") as span:
        assert not span.is_recording()


async def test_with_traces_off_a_message_carries_no_trace_header() -> None:
    broker = InMemoryBroker(Topology(prefix="off"))
    await broker.start()
    try:
        await broker.publish(job_requested(), KEY)
        await broker.publish_envelopes([job_requested(), job_requested()], BATCH_KEY)
        [single] = broker.messages(broker.topology.orchestrator.name)[:1]
        batch = broker.messages(broker.topology.orchestrator.name)[1]
        assert single.headers in (None, {})
        assert batch.headers in (None, {})
    finally:
        await broker.stop()


def test_the_exporters_are_the_ones_otel_traces_exporter_names() -> None:
    [console] = tracing.exporters({"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(console, ConsoleSpanExporter)
    assert tracing.exporters({"OTEL_TRACES_EXPORTER": "none"}) == []
    with pytest.raises(SystemExit) as unknown:
        tracing.exporters({"OTEL_TRACES_EXPORTER": "zipkin-of-my-own"})
    assert unknown.value.code == 2
    with pytest.raises(SystemExit) as grpc:
        tracing.exporters({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert grpc.value.code == 2


# -- on ---------------------------------------------------------------------------------


def test_a_traceparent_goes_into_amqp_headers_and_comes_back_out() -> None:
    with recorded_spans() as exporter:
        with tracing.span("request", root=True) as request:
            sent = tracing.current_traceparent()
        assert sent == tracing.traceparent_of(request)
        headers = tracing.headers_of([sent])
        assert headers == {"traceparent": sent}
        assert tracing.parent_in(headers) == sent
        batch = tracing.headers_of([sent, None])
        assert batch == {tracing.BATCH_TRACEPARENTS: [sent, ""]}
        assert [tracing.parent_in(batch, index) for index in range(3)] == [sent, None, None]
        with tracing.span("child", parent=sent):
            pass
    request_span, child = exporter.get_finished_spans()
    assert _parent(child) == _ids(request_span)


async def test_a_consumed_message_continues_the_trace_it_was_published_in(
    brokers: Brokers,
) -> None:
    seen = Seen()
    broker = await brokers.started(seen)
    envelope = job_requested()
    with recorded_spans() as exporter:
        with tracing.span("POST /api/ai-agent/create-canvas", root=True):
            await broker.publish(envelope, KEY)
        await seen.wait_for(1)
        spans = await _finished(exporter, 3)
    [request] = _named(spans, "POST /api/ai-agent/create-canvas")
    [publish] = _named(spans, "publish JobRequested")
    [process] = _named(spans, "process JobRequested")
    assert publish.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert _parent(publish) == _ids(request)
    assert _parent(process) == _ids(publish)
    [(_, message, inside)] = seen.seen
    assert _in(message.headers["traceparent"]) == _ids(publish)
    assert _in(inside) == _ids(process)
    assert process.attributes is not None
    assert process.attributes["canvas.job_id"] == str(envelope.job_id)
    assert process.attributes["canvas.correlation_id"] == "test"
    assert process.attributes["canvas.event_type"] == "JobRequested"
    assert process.attributes["canvas.queue"] == brokers.topology.orchestrator.name
    assert process.attributes["canvas.outcome"] == "ack"


async def test_each_event_of_a_batch_continues_its_own_jobs_trace(brokers: Brokers) -> None:
    seen = Seen()
    broker = await brokers.started(seen)
    first, second = job_requested(), job_requested()
    with recorded_spans() as exporter:
        parents = []
        for name in ("first", "second"):
            with tracing.span(name, root=True):
                parents.append(tracing.current_traceparent())
        await broker.publish_envelopes([first, second], BATCH_KEY, parents=parents)
        await seen.wait_for(2)
        spans = await _finished(exporter, 6)
    roots = _named(spans, "first") + _named(spans, "second")
    publishes = _named(spans, "publish JobRequested")
    processes = _named(spans, "process JobRequested")
    assert len(publishes) == len(processes) == 2
    assert {seen.seen[0][1].type, seen.seen[1][1].type} == {BATCH}
    for root, publish, process in zip(roots, publishes, processes, strict=True):
        assert _parent(publish) == _ids(root)
        assert _parent(process) == _ids(publish)
    assert roots[0].context.trace_id != roots[1].context.trace_id


async def test_a_batch_event_retried_alone_keeps_its_own_trace(brokers: Brokers) -> None:
    seen = Seen()
    broker = await brokers.started(seen)
    first, second = job_requested(), job_requested()
    seen.retry_once.add(str(second.event_id))
    with recorded_spans() as exporter:
        await broker.publish_envelopes([first, second], BATCH_KEY)
        await seen.wait_for(3)
        spans = await _finished(exporter, 5)
    publishes = _named(spans, "publish JobRequested")
    again = seen.seen[2][1]
    assert again.type == "JobRequested"
    assert tracing.BATCH_TRACEPARENTS not in again.headers
    assert _in(again.headers["traceparent"]) == _ids(publishes[1])
    tries = _named(spans, "process JobRequested")
    outcomes = sorted(str((span.attributes or {}).get("canvas.outcome")) for span in tries)
    assert outcomes == ["ack", "ack", "redeliver"]
    assert {_parent(span) for span in tries} == {_ids(publish) for publish in publishes}


async def test_the_batch_publisher_publishes_in_the_trace_of_each_caller() -> None:
    broker = InMemoryBroker(Topology(prefix="bp"))
    await broker.start()
    publisher = BatchPublisher(broker, GATEWAY)

    async def request(name: str) -> None:
        with tracing.span(name, root=True):
            await publisher.publish(job_requested())

    try:
        with recorded_spans() as exporter:
            # Three at once: they travel together, in a batch.
            await asyncio.gather(*(request(f"request {n}") for n in range(3)))
            spans = list(exporter.get_finished_spans())
    finally:
        await broker.stop()
    keys = [item.routing_key for item in broker.published]
    assert BATCH_KEY in keys, keys
    for n in range(3):
        [root] = _named(spans, f"request {n}")
        [publish] = [s for s in _named(spans, "publish JobRequested") if _parent(s) == _ids(root)]
        assert publish.kind is SpanKind.PRODUCER


def test_a_log_line_inside_a_span_carries_its_trace_and_span_ids() -> None:
    out = io.StringIO()
    configure_logging("gateway", stream=out)
    with recorded_spans():
        with tracing.span("request", root=True) as span:
            log = structlog.get_logger("test")
            log.info("inside")
        log.info("outside")
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(span.get_span_context().span_id, "016x")
    assert "trace_id" not in outside
