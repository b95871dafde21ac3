"""Entry point of the ``canvas-jobs`` command: runs the typer app and turns every error
into a message on stderr and the exit code :class:`~canvas_cli.errors.ExitCode` names
(typer's own usage errors exit 2, which here means "cancelled": they exit 3)."""

from __future__ import annotations

from collections.abc import Sequence

import typer
from rich.console import Console
from typer import rich_utils

from canvas_cli.app import PROGRAM, app
from canvas_cli.errors import CliError, ExitCode


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``canvas-jobs`` with ``argv`` (default: the process's); return the exit code."""
    command = typer.main.get_command(app)
    try:
        result = command.main(
            args=list(argv) if argv is not None else None,
            prog_name=PROGRAM,
            standalone_mode=False,
        )
    except typer.TyperException as exc:  # usage errors, bad parameters
        # Typer raises its vendored click's exceptions, all TyperExceptions; the
        # formatter reads only format_message() and an optional ctx.
        rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
        return ExitCode.ERROR
    except typer.Abort:
        return ExitCode.INTERRUPTED
    except CliError as exc:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(f"{PROGRAM}: error: {exc.message}", markup=False)
        if exc.hint:
            err.print(f"  hint: {exc.hint}", markup=False, style="dim")
        return exc.exit_code
    # standalone_mode=False: typer.Exit(code) comes back as its code; a command that
    # simply returns gives None.
    return result if isinstance(result, int) else ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
