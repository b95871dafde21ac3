"""The ``canvas-jobs`` commands (typer): each one call or two to the gateway, and for
``watch`` the notifier's WebSocket. Errors are raised as
:class:`~canvas_cli.errors.CliError` and printed by :mod:`canvas_cli.__main__`."""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, TypeVar
from uuid import UUID

import typer
from rich.console import Console

from canvas_cli.api import MAX_PAGE, AdminFilter, Gateway
from canvas_cli.config import DEFAULT_GATEWAY_URL, DEFAULT_NOTIFIER_URL, Config
from canvas_cli.errors import CliError, ExitCode
from canvas_cli.render import events_table, jobs_table, objects_table, status_table, usage_table
from canvas_cli.view import JobView
from canvas_cli.watch import Follower, JsonSink, LinesSink, LiveSink, Sink

PROGRAM = "canvas-jobs"
# Width of tables when stdout is not a terminal (and COLUMNS is unset): wide enough
# for a job id and its outcome on one line, so that pipes and greps see whole rows.
PIPE_WIDTH = 160

app = typer.Typer(
    name=PROGRAM,
    help="Draw on a canvas from the terminal: submit prompts to canvas-jobs and watch "
    "them run.\n\nExit codes: 0 done (a watched job completed), 1 the job failed, "
    "2 it was cancelled, 3 a usage, authentication, HTTP or connection error.",
    no_args_is_help=True,
    # --install-completion and --show-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
    # Locals in a traceback could show the token.
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)

T = TypeVar("T")


class JobStatus(StrEnum):
    """A job's status (the gateway's, docs/api.md), for ``jobs --status``."""

    queued = "queued"  # waiting for a generator
    processing = "processing"  # a generator is calling the model
    retry_scheduled = "retry_scheduled"  # an attempt failed; another follows
    completed = "completed"  # final: its objects are on the canvas
    failed = "failed"  # final: no objects; the error says why
    cancelled = "cancelled"  # final: cancelled by its user


@dataclass(frozen=True)
class Options:
    """The global options, as given; :func:`_config` checks them when a command needs
    them (``token`` does not)."""

    gateway_url: str
    notifier_url: str
    token: str | None


def _consoles() -> tuple[Console, Console]:
    out = Console(highlight=False, soft_wrap=True)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(highlight=False, soft_wrap=True, width=PIPE_WIDTH)
    return out, Console(stderr=True, highlight=False, soft_wrap=True)


def _config(ctx: typer.Context) -> Config:
    options: Options = ctx.ensure_object(Options)
    return Config(options.gateway_url, options.notifier_url, options.token)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _job_id(value: str) -> str:
    try:
        return str(UUID(value))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a job id (a UUID)") from None


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _ask(ctx: typer.Context, call: Callable[[Gateway], Awaitable[T]]) -> T:
    """``call`` on a gateway client with the options' URL and token."""
    config = _config(ctx)

    async def go() -> T:
        async with Gateway(config.gateway_url, config.require_token()) as gateway:
            return await call(gateway)

    return _run(go())


def _show_list(
    found: list[dict[str, Any]],
    *,
    json_: bool,
    as_json: dict[str, Any],
    table: Callable[[list[dict[str, Any]]], Any],
    empty: str,
) -> None:
    """``as_json`` with --json; else ``found`` as a table, or ``empty`` on stderr."""
    if json_:
        _print_json(as_json)
        return
    out, err = _consoles()
    if found:
        out.print(table(found))
    else:
        err.print(empty, markup=False)


def _user(value: str) -> str:
    if not 0 < len(value) <= 128:
        raise typer.BadParameter("must be 1 to 128 characters")
    return value


def _ttl(value: float) -> float:
    if not 0 < value <= 24 * 365:
        raise typer.BadParameter("must be more than 0 and at most 8760 (a year)")
    return value


def _print_version(value: bool) -> None:
    if value:
        print(f"{PROGRAM} {importlib.metadata.version('canvas-cli')}")
        raise typer.Exit()


JobArg = Annotated[str, typer.Argument(help="The job's id.", callback=_job_id, show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
# The Idempotency-Key of a command that makes a job (submit, retry).
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--idempotency-key", help="A retry with the same key gets the same job, never two."
    ),
]


@app.callback()
def _global(
    ctx: typer.Context,
    gateway_url: Annotated[
        str,
        typer.Option("--gateway-url", envvar="CANVAS_GATEWAY_URL", help="The gateway's base URL."),
    ] = DEFAULT_GATEWAY_URL,
    notifier_url: Annotated[
        str,
        typer.Option(
            "--notifier-url", envvar="CANVAS_NOTIFIER_URL", help="The notifier's WebSocket URL."
        ),
    ] = DEFAULT_NOTIFIER_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="CANVAS_TOKEN",
            # Never shown, even when it comes from the environment.
            show_default=False,
            help="Bearer token (JWT) of the user to act as.",
        ),
    ] = None,
    _version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Global options come before the command: canvas-jobs --token T status JOB."""
    ctx.obj = Options(gateway_url, notifier_url, token)


@app.command()
def token(
    user: Annotated[str, typer.Option("--user", help="The token's user id (sub).", callback=_user)],
    admin: Annotated[bool, typer.Option("--admin", help="Add the admin role.")] = False,
    ttl_hours: Annotated[
        float, typer.Option("--ttl-hours", help="Lifetime in hours.", callback=_ttl)
    ] = 24 * 7,
) -> None:
    """Print a development token signed with JWT_SECRET.

    The same token as canvas-gateway token prints; without JWT_SECRET it is signed
    with the development secret, with a warning.
    """
    # Imported here: pydantic-settings and PyJWT cost every other command ~0.1 s of start-up.
    from pydantic import ValidationError

    from canvas_events.auth import mint_token
    from canvas_events.settings import AuthSettings

    try:
        settings = AuthSettings()
    except ValidationError:
        raise CliError(
            "JWT_SECRET is not set (or shorter than 32 characters)",
            hint="set JWT_SECRET to the services' secret, or CANVAS_ENV=development for "
            "the development one",
        ) from None
    if settings.jwt_secret_is_default:
        print(
            f"{PROGRAM}: warning: JWT_SECRET is not set; signing with the development secret",
            file=sys.stderr,
        )
    print(mint_token(user, settings.secret, admin=admin, ttl=timedelta(hours=ttl_hours)))


@app.command()
def submit(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to draw.", show_default=False)],
    canvas: Annotated[
        str | None, typer.Option("--canvas", help="The canvas to draw on (default: a new one).")
    ] = None,
    priority: Annotated[
        int | None, typer.Option("--priority", min=0, max=9, help="0..9, higher first [5].")
    ] = None,
    idempotency_key: KeyOpt = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Follow the job until it ends.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Submit a prompt and print the job's id.

    With --watch, follow the job to its end: exit 0 completed, 1 failed, 2 cancelled.
    """
    _start_job(
        ctx,
        lambda gateway: gateway.submit(
            prompt, canvas_id=canvas, priority=priority, idempotency_key=idempotency_key
        ),
        watch=watch,
        json_=json_,
    )


@app.command()
def retry(
    ctx: typer.Context,
    job: JobArg,
    idempotency_key: KeyOpt = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Follow the new job until it ends.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Run a failed, cancelled or completed job again and print the new job's id.

    The new job has the same prompt, canvas, priority and options; an admin may retry
    anyone's job (the new one is its owner's). A job still running is an error (exit 3).
    With --watch, as submit --watch.
    """
    _start_job(
        ctx,
        lambda gateway: gateway.retry(job, idempotency_key=idempotency_key),
        watch=watch,
        json_=json_,
    )


def _start_job(
    ctx: typer.Context,
    start: Callable[[Gateway], Awaitable[dict[str, Any]]],
    *,
    watch: bool,
    json_: bool,
) -> None:
    """Make a job with ``start`` (a create or a retry), print its id, and with ``watch``
    follow it to its end (the exit code says how it ended)."""
    config = _config(ctx)
    out, err = _consoles()
    sink = _sink(json_, out, err) if watch else None
    started: list[str] = []  # the job's id once known, for the Ctrl-C message

    async def go() -> JobView | None:
        token = config.require_token()
        async with Gateway(config.gateway_url, token) as gateway:
            follower = None
            ws = None
            if sink is not None:
                follower = Follower(gateway, config.notifier_url, token, JobView(""), sink)
                # Before the POST: a connection without `after` starts live, so every
                # frame of the new job reaches it.
                ws = await follower.connect()
            try:
                accepted = await start(gateway)
            except BaseException:
                if ws is not None:
                    await ws.close()
                raise
            started.append(accepted["job_id"])
            _print_accepted(accepted, json_=json_, watch=watch, out=out)
            if follower is None:
                return None
            follower.view = JobView(accepted["job_id"], canvas_id=accepted.get("canvas_id"))
            if isinstance(sink, LiveSink):
                sink.start(follower.view)
            return await follower.run(ws)

    view = _interruptible(go(), err, job_ids=started)
    if view is not None:
        raise typer.Exit(_exit_code(view))


def _print_accepted(accepted: dict[str, Any], *, json_: bool, watch: bool, out: Console) -> None:
    """The create call's answer: its job id, or the whole answer as JSON."""
    if json_ and watch:
        # One JSON document per line: the answer first, then the frames.
        print(json.dumps(accepted, separators=(",", ":")), flush=True)
    elif json_:
        _print_json(accepted)
    else:
        out.print(accepted["job_id"], markup=False)


@app.command()
def watch(ctx: typer.Context, job: JobArg, json_: JsonOpt = False) -> None:
    """Follow a job until it ends.

    A finished job prints its outcome at once. Exit 0 completed, 1 failed, 2 cancelled.
    """
    config = _config(ctx)
    out, err = _consoles()
    sink = _sink(json_, out, err)

    async def go() -> JobView:
        token = config.require_token()
        async with Gateway(config.gateway_url, token) as gateway:
            view = JobView(job)
            if isinstance(sink, LiveSink):
                sink.start(view)
            return await Follower(gateway, config.notifier_url, token, view, sink).run()

    raise typer.Exit(_exit_code(_interruptible(go(), err, job_ids=[job])))


@app.command()
def status(ctx: typer.Context, job: JobArg, json_: JsonOpt = False) -> None:
    """Show a job's status, result or error."""
    answer = _ask(ctx, lambda gateway: gateway.status(job))
    if json_:
        _print_json(answer)
    else:
        _consoles()[0].print(status_table(answer))


@app.command()
def jobs(
    ctx: typer.Context,
    status: Annotated[
        JobStatus | None, typer.Option("--status", help="Only jobs in this status.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many jobs.")] = 20,
    all_: Annotated[bool, typer.Option("--all", help="Every job (no limit).")] = False,
    page_size: Annotated[
        int, typer.Option("--page-size", min=1, max=MAX_PAGE, help="Jobs per request.")
    ] = MAX_PAGE,
    all_users: Annotated[
        bool, typer.Option("--all-users", help="Every user's jobs (admins only).")
    ] = False,
    user: Annotated[
        str | None, typer.Option("--user", help="With --all-users: only this user's jobs.")
    ] = None,
    search: Annotated[
        str | None,
        typer.Option("--search", help="With --all-users: only jobs whose prompt contains this."),
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option(
            "--since",
            help="With --all-users: only jobs created since this time (ISO 8601; UTC "
            "unless it names a zone).",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """List your jobs (or, with --all-users, everyone's), newest first, following the
    gateway's pages."""
    if not all_users and (user or search or since):
        raise CliError("--user, --search and --since filter --all-users; add --all-users")
    where = AdminFilter(
        user_id=user,
        text=search,
        since=since.replace(tzinfo=since.tzinfo or UTC) if since else None,
    )

    async def listed(gateway: Gateway) -> list[dict[str, Any]]:
        return [
            job
            async for job in gateway.jobs(
                status=status.value if status else None,
                limit=None if all_ else limit,
                page_size=page_size,
                everyone=where if all_users else None,
            )
        ]

    found = _ask(ctx, listed)
    table = functools.partial(jobs_table, with_user=all_users)
    _show_list(found, json_=json_, as_json={"jobs": found}, table=table, empty="no jobs")


@app.command()
def events(ctx: typer.Context, job: JobArg, json_: JsonOpt = False) -> None:
    """Show a job's recorded events, in order."""
    found = _ask(ctx, lambda gateway: gateway.events(job))
    as_json = {"job_id": job, "events": found}
    empty = "no events recorded yet"
    _show_list(found, json_=json_, as_json=as_json, table=events_table, empty=empty)


@app.command()
def objects(
    ctx: typer.Context,
    canvas: Annotated[str, typer.Argument(help="The canvas's id.", show_default=False)],
    json_: JsonOpt = False,
) -> None:
    """Show the objects on one of your canvases, in drawing order."""
    found = _ask(ctx, lambda gateway: gateway.canvas_objects(canvas))
    as_json = {"canvas_id": canvas, "objects": found}
    empty = "no objects on this canvas yet"
    _show_list(found, json_=json_, as_json=as_json, table=objects_table, empty=empty)


@app.command()
def usage(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Show your model tokens today and your daily budget.

    The count is of your jobs completed since 00:00 UTC; at the budget, submit is
    refused (429) until the reset time shown (in local time).
    """
    answer = _ask(ctx, lambda gateway: gateway.usage())
    if json_:
        _print_json(answer)
    else:
        _consoles()[0].print(usage_table(answer))


@app.command()
def cancel(ctx: typer.Context, job: JobArg, json_: JsonOpt = False) -> None:
    """Cancel a job.

    It ends cancelled and none of its objects reach the canvas; a job that has already
    ended is an error (exit 3).
    """
    answer = _ask(ctx, lambda gateway: gateway.cancel(job))
    if json_:
        _print_json(answer)
    else:
        _consoles()[0].print(f"cancelling {job}", markup=False)


def _sink(json_: bool, out: Console, err: Console) -> Sink:
    if json_:
        return JsonSink(err)
    if out.is_terminal:
        return LiveSink(out)
    return LinesSink(out, err)


def _exit_code(view: JobView) -> int:
    return {
        "completed": ExitCode.OK,
        "failed": ExitCode.FAILED,
        "cancelled": ExitCode.CANCELLED,
    }.get(view.status, ExitCode.ERROR)


def _interruptible(coro: Coroutine[Any, Any, T], err: Console, job_ids: list[str]) -> T:
    try:
        return _run(coro)
    except KeyboardInterrupt:
        again = f": canvas-jobs watch {job_ids[0]}" if job_ids else ""
        err.print(f"\nstopped watching; the job goes on{again}", markup=False)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
