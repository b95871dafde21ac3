"""The tables and the live panel, rendered to text."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console, RenderableType

from canvas_cli.render import (
    duration,
    events_table,
    jobs_table,
    live_panel,
    status_table,
    usage_table,
)
from canvas_cli.view import JobView

JOB = "3f1c9a52-8d7e-4b1a-9c33-2f5d6e7a8b90"


def text(renderable: RenderableType) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def job(**fields: Any) -> dict[str, Any]:
    return {
        "id": JOB,
        "status": "completed",
        "canvas_id": "board",
        "priority": 5,
        "created_at": "2025-01-01T12:00:00+00:00",
        "started_at": "2025-01-01T12:00:01+00:00",
        "completed_at": "2025-01-01T12:00:04+00:00",
        "error_message": None,
        "retry_count": 0,
        "next_attempt_at": None,
        "result": {
            "object_count": 3,
            "dropped_objects": 0,
            "model": "gpt",
            "usage": {"total_tokens": 10},
            "latency_ms": 2900,
        },
        **fields,
    }


def test_a_status_table_shows_the_result_and_how_long_the_job_took() -> None:
    output = text(status_table(job()))
    assert JOB in output
    assert "completed" in output
    assert "3 objects, model gpt, 2.9 s" in output
    assert "4.0 s" in output  # created → ended
    assert "total_tokens 10" in output


def test_a_status_table_shows_the_error_of_a_failed_job() -> None:
    output = text(status_table(job(status="failed", result=None, error_message="bad key")))
    assert "failed" in output
    assert "bad key" in output


def test_text_from_prompts_and_models_is_never_read_as_markup() -> None:
    events = [
        {
            "type": "JobRequested",
            "version": 1,
            "position": 1,
            "occurred_at": "2025-01-01T12:00:00+00:00",
            "data": {"query": "a box [[fake:delay_ms=5]] [bold]x[/bold]", "canvas_id": "c"},
        }
    ]
    output = text(events_table(events))
    assert "[[fake:delay_ms=5]] [bold]x[/bold]" in output
    view = JobView(JOB, status="processing")
    view.objects[0] = {"type": "text", "x": 1, "y": 1, "text": "[red]hi[/red]"}
    assert '"[red]hi[/red]"' in text(live_panel(view))


def test_a_jobs_table_has_a_row_per_job_with_its_outcome() -> None:
    output = text(
        jobs_table(
            [
                job(),
                job(id="other", status="retry_scheduled", result=None),
                job(id="third", status="failed", result=None, error_message="no key"),
            ]
        )
    )
    lines = output.splitlines()
    assert len(lines) == 4  # header and three rows
    assert JOB in lines[1] and "3 objects" in lines[1]
    assert "other" in lines[2] and "retry_scheduled" in lines[2]
    assert "third" in lines[3] and "no key" in lines[3]


def test_the_live_panel_shows_status_objects_and_errors() -> None:
    view = JobView(JOB, canvas_id="board", status="processing", attempts=2, model="gpt")
    for index in range(20):
        view.objects[index] = {"type": "circle", "x": index, "y": 0, "radius": 1}
    output = text(live_panel(view))
    assert JOB in output and "processing" in output and "attempt 2" in output
    assert "… 8 earlier" in output  # only the last 12 objects are drawn
    assert "19  circle at (19, 0) r=1" in output
    assert "circle at (7, 0)" not in output
    assert "circle at (8, 0)" in output

    lost = text(live_panel(JobView(JOB), connected=False))
    assert "polling the gateway" in lost


def test_durations_read_in_seconds_then_minutes() -> None:
    assert duration("2025-01-01T12:00:00+00:00", "2025-01-01T12:00:01.25+00:00") == "1.2 s"
    assert duration("2025-01-01T12:00:00+00:00", "2025-01-01T12:03:05+00:00") == "3m 05s"
    assert duration("2025-01-01T12:00:00+00:00", None) is None


def test_usage_shows_tokens_budget_and_whats_left() -> None:
    shown = text(
        usage_table(
            {"tokens_used_today": 1234, "daily_budget": 10000, "resets_at": "2026-12-07T00:00:00Z"}
        )
    )
    assert "tokens today  1,234" in shown
    assert "daily budget  10,000" in shown
    assert "left          8,766" in shown
    assert "resets at" in shown
    assert "2026-12-0" in shown  # in local time: the 6th or the 7th


def test_usage_over_the_budget_leaves_0_and_without_one_says_none() -> None:
    over = text(
        usage_table(
            {"tokens_used_today": 1100, "daily_budget": 1000, "resets_at": "2026-12-07T00:00:00Z"}
        )
    )
    assert "left          0" in over
    unlimited = text(
        usage_table(
            {"tokens_used_today": 7, "daily_budget": None, "resets_at": "2026-12-07T00:00:00Z"}
        )
    )
    assert "daily budget  none" in unlimited
    assert "left" not in unlimited
