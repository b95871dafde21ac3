"""Traces (docs/operations.md, "Traces"): one job submitted over HTTP leaves one trace,
joined from the spans of four processes. The services run as real processes with
OTEL_TRACES_EXPORTER=otlp and export, with the exporter they ship with, to an OTLP/HTTP
receiver in this test (tests/support/otlp.py), which decodes them as a collector would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.otlp import OtlpReceiver, Span
from tests.support.system import System, running_system
from tests.support.users import User
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

SERVICES = {"gateway", "job-orchestrator", "ai-generator", "notifier"}
CREATE = "POST /api/ai-agent/create-canvas"
REQUEST_ID = "trace-e2e-0001"


@pytest.fixture(scope="module")
async def traced(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[System, OtlpReceiver]]:
    """A whole system whose services export their spans to a receiver of this test."""
    with OtlpReceiver() as receiver:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            # Exported a tenth of a second after they end, not five seconds.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        log_dir: Path = tmp_path_factory.mktemp("traces-logs")
        async with running_system(log_dir, label="traces", extra_env=env) as system:
            yield system, receiver


def _ancestry(span: Span, by_id: dict[str, Span]) -> list[Span]:
    """``span``, its parent, the parent's parent... up to the trace's root."""
    chain = [span]
    while chain[-1].parent_id is not None:
        chain.append(by_id[chain[-1].parent_id])
    return chain


def _collapsed(chain: list[Span]) -> list[str]:
    """The services a chain of spans passes through, each run of one service once."""
    services: list[str] = []
    for span in chain:
        if not services or services[-1] != span.service:
            services.append(span.service)
    return services


async def _whole_trace(receiver: OtlpReceiver, job_id: str) -> tuple[Span, list[Span]]:
    """The job's root span and every span of its trace, once the trace is whole: spans
    from the four services, the notifier's delivery of the job's last frame, and no span
    whose parent has not arrived yet."""

    def whole() -> tuple[Span, list[Span]] | None:
        roots = [
            span
            for span in receiver.received()
            if span.name == CREATE and span.attribute("canvas.job_id") == job_id
        ]
        if not roots:
            return None
        spans = receiver.trace(roots[0].trace_id)
        ids = {span.span_id for span in spans}
        delivered = any(
            span.name == "deliver"
            and span.attribute("canvas.frame_type") == "ai_generation_completed"
            for span in spans
        )
        dangling = [span for span in spans if span.parent_id and span.parent_id not in ids]
        if {span.service for span in spans} >= SERVICES and delivered and not dangling:
            return roots[0], spans
        return None

    return await eventually(whole, timeout=30, what=f"the whole trace of {job_id}")


async def test_one_jobs_spans_from_four_processes_join_in_one_trace(
    traced: tuple[System, OtlpReceiver],
) -> None:
    system, receiver = traced
    async with User(system) as user, user.socket() as socket:
        answer = await user.http.post(
            "/api/ai-agent/create-canvas",
            json={"query": "a flowchart of a login flow"},
            headers={"X-Request-ID": REQUEST_ID},
        )
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["job_id"]
        frames = await socket.until_final(job_id)
        assert frames[-1]["type"] == "ai_generation_completed"

    root, spans = await _whole_trace(receiver, job_id)
    by_id = {span.span_id: span for span in spans}

    # One root: the gateway's request, the trace's only span without a parent.
    assert [span for span in spans if span.parent_id is None] == [root]
    assert (root.service, root.kind) == ("gateway", "SERVER")
    assert root.attribute("http.response.status_code") == 202
    assert root.attribute("canvas.correlation_id") == REQUEST_ID
    assert not any(span.error for span in spans), [s.name for s in spans if s.error]

    # The model call, under the work message the orchestrator's relay sent, under the
    # request the gateway published: each hop the child of the one before.
    [chat] = [span for span in spans if span.name == "chat fake-canvas-1"]
    assert (chat.service, chat.kind) == ("ai-generator", "CLIENT")
    assert chat.attribute("gen_ai.request.model") == "fake-canvas-1"
    assert chat.attribute("gen_ai.usage.output_tokens") > 0
    assert [(span.service, span.name) for span in _ancestry(chat, by_id)] == [
        ("ai-generator", "chat fake-canvas-1"),
        ("ai-generator", "process GenerationRequested"),
        ("job-orchestrator", "publish GenerationRequested"),
        ("job-orchestrator", "process JobRequested"),
        ("gateway", "publish JobRequested"),
        ("gateway", CREATE),
    ]

    # The notifier's delivery of the last frame goes back through all four.
    [delivered] = [
        span
        for span in spans
        if span.name == "deliver"
        and span.attribute("canvas.frame_type") == "ai_generation_completed"
    ]
    chain = _ancestry(delivered, by_id)
    assert _collapsed(chain) == [
        "notifier",
        "job-orchestrator",
        "ai-generator",
        "job-orchestrator",
        "gateway",
    ]
    assert {"publish GenerationSucceeded", "process GenerationSucceeded"} <= {
        span.name for span in chain
    }

    # Every message consumed is the child of the span that published it, and every
    # message span names the job, its correlation id and its event type.
    for span in spans:
        if span.name.startswith("process "):
            parent = by_id[span.parent_id or ""]
            assert (parent.kind, span.kind) == ("PRODUCER", "CONSUMER")
            assert parent.name == span.name.replace("process", "publish", 1)
            assert span.attribute("canvas.queue")
        if span.name.startswith(("process ", "publish ")):
            assert span.attribute("canvas.job_id") == job_id, span
            assert span.attribute("canvas.correlation_id") == REQUEST_ID, span
            assert span.name.endswith(span.attribute("canvas.event_type"))

    # The orchestrator's transactions are in the trace too.
    transactions = [span for span in spans if span.name == "transaction"]
    assert transactions and {span.service for span in transactions} == {"job-orchestrator"}
    assert all(by_id[t.parent_id or ""].name.startswith("process ") for t in transactions)

    # And the log lines written inside the request's span say which trace they are in.
    [accepted] = [
        line
        for line in system.processes["gateway"].log_lines()
        if line["event"] == "job accepted" and line.get("job_id") == job_id
    ]
    assert accepted["trace_id"] == root.trace_id
