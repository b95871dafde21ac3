"""Rich renderables for the CLI's answers: a job's status, a list of jobs, a job's
events, and the live panel of a watched job. Pure: data in, renderable out."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from canvas_cli.view import JobView, describe_object, describe_result, plural, short_time

STATUS_STYLES: Final = {
    "submitted": "dim",
    "queued": "cyan",
    "processing": "blue",
    "retry_scheduled": "yellow",
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
}
# Objects shown in the live panel: the last ones drawn; the count says how many more.
LIVE_OBJECTS: Final = 12


def _plain(value: object) -> Text:
    # A cell as literal text: prompts and model output may hold "[...]", which rich
    # would otherwise read as markup (and swallow).
    return Text(str(value))


def status_text(status: str) -> Text:
    """A status word in its colour."""
    return Text(status, style=STATUS_STYLES.get(status, ""))


def _time(value: Any) -> str:
    if not isinstance(value, str):
        return "-"
    try:
        return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def duration(start: Any, end: Any) -> str | None:
    """``end - start`` as ``1.2 s`` or ``3m 05s``; None when either is missing."""
    if not isinstance(start, str) or not isinstance(end, str):
        return None
    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m {rest:02d}s"


def outcome_of(job: dict[str, Any]) -> str:
    """A job's result or error in one phrase, for tables."""
    if job.get("status") == "completed" and isinstance(job.get("result"), dict):
        return describe_result(job["result"])
    if job.get("error_message"):
        return str(job["error_message"])
    if job.get("status") == "retry_scheduled" and job.get("next_attempt_at"):
        return f"next attempt at {short_time(job['next_attempt_at'])}"
    return ""


def status_table(job: dict[str, Any]) -> Table:
    """One job's status answer as a two-column table."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("job", _plain(job.get("id", "")))
    table.add_row("status", status_text(str(job.get("status", "?"))))
    if job.get("query"):
        table.add_row("prompt", _plain(str(job["query"])))
    if job.get("retry_of"):
        table.add_row("runs again", _plain(str(job["retry_of"])))
    if job.get("waiting_for") and job.get("status") == "queued":
        table.add_row("waiting for", _plain(str(job["waiting_for"])))
    table.add_row("canvas", _plain(job.get("canvas_id", "")))
    table.add_row("priority", str(job.get("priority", "")))
    table.add_row("created", _plain(_time(job.get("created_at"))))
    table.add_row("started", _plain(_time(job.get("started_at"))))
    table.add_row("ended", _plain(_time(job.get("completed_at"))))
    took = duration(job.get("created_at"), job.get("completed_at"))
    if took:
        table.add_row("took", took)
    table.add_row("retries", str(job.get("retry_count", 0)))
    if job.get("next_attempt_at"):
        table.add_row("next attempt", _plain(_time(job["next_attempt_at"])))
    if job.get("error_message"):
        table.add_row("error", Text(str(job["error_message"]), style="red"))
    result = job.get("result")
    if isinstance(result, dict):
        table.add_row("result", _plain(describe_result(result)))
        usage = result.get("usage")
        if isinstance(usage, dict) and usage:
            tokens = ", ".join(f"{k} {v}" for k, v in sorted(usage.items()))
            table.add_row("tokens", _plain(tokens))
    return table


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def usage_table(usage: dict[str, Any]) -> Table:
    """The caller's tokens today against their daily budget, as a two-column table."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    used, budget = usage.get("tokens_used_today"), usage.get("daily_budget")
    table.add_row("tokens today", _count(used))
    if budget is None:
        table.add_row("daily budget", "none")
    else:
        table.add_row("daily budget", _count(budget))
        left = budget - used if isinstance(budget, int) and isinstance(used, int) else None
        over = left is not None and left <= 0
        table.add_row(
            "left",
            Text(_count(max(left, 0)) if left is not None else "?", style="red" if over else ""),
        )
    table.add_row("resets at", _plain(_time(usage.get("resets_at"))))
    return table


def jobs_table(jobs: list[dict[str, Any]], *, with_user: bool = False) -> Table:
    """Jobs, one row each (``with_user``: whose each is, for an admin's list)."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("job", no_wrap=True, min_width=36)
    if with_user:
        table.add_column("user", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("pri", justify="right")
    table.add_column("retries", justify="right")
    table.add_column("prompt", overflow="fold", max_width=40)
    table.add_column("result / error", overflow="fold")
    for job in jobs:
        user = [_plain(str(job.get("user_id", "")))] if with_user else []
        table.add_row(
            _plain(job.get("id", "")),
            *user,
            status_text(str(job.get("status", "?"))),
            _plain(_time(job.get("created_at"))),
            str(job.get("priority", "")),
            str(job.get("retry_count", 0)),
            _plain(_short(str(job.get("query", "")), 60)),
            _plain(outcome_of(job)),
        )
    return table


def _short(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def event_details(event: dict[str, Any]) -> str:
    """What one recorded event says, in a phrase."""
    data: dict[str, Any] = event.get("data") or {}
    kind = event.get("type")
    if kind == "JobRequested":
        again = f", runs {data['retry_of']} again" if data.get("retry_of") else ""
        return f'"{_short(str(data.get("query", "")), 60)}" on {data.get("canvas_id", "?")}{again}'
    if kind == "JobQueued":
        return f"priority {data.get('priority', '?')}, retry {data.get('retry_count', 0)}"
    if kind == "GenerationRequested":
        return f"attempt {data.get('attempt', '?')}"
    if kind == "GenerationStarted":
        return f"model {data.get('model', '?')} on {data.get('generator_id', '?')}"
    if kind == "GenerationProgressed":
        obj = data.get("object")
        return f"{data.get('index', '?')}: {describe_object(obj) if isinstance(obj, dict) else '?'}"
    if kind == "GenerationSucceeded":
        objects = data.get("objects")
        count = len(objects) if isinstance(objects, list) else 0
        return f"{plural(count, 'object')}, {data.get('dropped_objects', 0)} dropped"
    if kind == "GenerationFailed":
        again = "retryable" if data.get("retryable") else "permanent"
        return f"{data.get('kind', '?')} ({again}): {data.get('error', '')}"
    if kind == "JobRetryScheduled":
        return f"retry {data.get('retry_count', '?')} at {_time(data.get('next_attempt_at'))}"
    if kind == "JobCompleted":
        return describe_result(data)
    if kind == "JobFailed":
        return str(data.get("error", ""))
    if kind in ("JobCancelRequested", "JobCancelled"):
        return str(data.get("reason") or "")
    return ""


def events_table(events: list[dict[str, Any]]) -> Table:
    """A job's recorded events, in order."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("pos", justify="right", no_wrap=True)
    table.add_column("ver", justify="right", no_wrap=True)
    table.add_column("at", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("details", overflow="fold")
    for event in events:
        table.add_row(
            str(event.get("position", "")),
            str(event.get("version", "")),
            _plain(short_time(event.get("occurred_at"))),
            _plain(event.get("type", "")),
            _plain(event_details(event)),
        )
    return table


def objects_table(objects: list[dict[str, Any]]) -> Table:
    """A canvas's objects, in drawing order: each one's type, job, place and text."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("type", no_wrap=True)
    table.add_column("job", no_wrap=True)
    table.add_column("at", no_wrap=True)
    table.add_column("text", overflow="fold")
    for item in objects:
        at = (
            f"{item['x']:g},{item['y']:g}"
            if isinstance(item.get("x"), int | float) and isinstance(item.get("y"), int | float)
            else ""
        )
        table.add_row(
            _plain(str(item.get("type", ""))),
            _plain(str(item.get("job_id", ""))[:8]),
            at,
            _plain(str(item.get("text", ""))),
        )
    return table


def live_panel(view: JobView, *, connected: bool = True) -> RenderableType:
    """The watched job as the live display draws it: status, objects, errors."""
    head = Text.assemble(
        ("job ", "bold"),
        view.job_id,
        "  ",
        status_text(view.status),
    )
    if view.attempts:
        head.append(f"  attempt {view.attempts}", style="dim")
    if view.model:
        head.append(f"  model {view.model}", style="dim")
    if not connected:
        head.append("  (live updates lost: polling the gateway)", style="yellow")
    parts: list[RenderableType] = [head]
    if view.canvas_id:
        parts.append(Text(f"canvas {view.canvas_id}", style="dim"))
    if view.objects:
        table = Table(box=None, pad_edge=False, show_header=False)
        table.add_column("index", justify="right", style="dim")
        table.add_column("object", overflow="ellipsis", no_wrap=True)
        shown = sorted(view.objects.items())[-LIVE_OBJECTS:]
        hidden = len(view.objects) - len(shown)
        if hidden:
            table.add_row("", Text(f"… {hidden} earlier", style="dim"))
        for index, obj in shown:
            table.add_row(str(index), _plain(describe_object(obj)))
        parts.append(table)
    elif view.status == "processing":
        parts.append(Text("drawing…", style="dim"))
    for failure in view.failures[-3:]:
        line = Text(("failed: " if failure.final else "error: ") + failure.error, style="red")
        if not failure.final and failure.next_attempt_at:
            line.append(
                f"  (retry {failure.retry_count} at {short_time(failure.next_attempt_at)})",
                style="yellow",
            )
        parts.append(line)
    if view.status == "completed" and view.result is not None:
        parts.append(Text(f"completed: {describe_result(view.result)}", style="green"))
    elif view.status == "cancelled":
        parts.append(Text("cancelled" + (f": {view.reason}" if view.reason else ""), "magenta"))
    return Group(*parts)
