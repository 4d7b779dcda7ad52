"""The `app` command."""

from __future__ import annotations

import typer

from app.cli import dashboard, dead, dev, jobs, loadtest, monitor, schedules, worker
from app.cli.common import fail
from app.cli.queues import queues
from app.cli.workflow import workflow_cli
from app.core.errors import AppError
from app.core.settings import get_settings

cli = typer.Typer(
    name="app",
    help="Background jobs on Redis, on the engine you choose per queue (arq, Dramatiq, TaskIQ).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@cli.callback()
def _validate_settings() -> None:
    """Read and validate settings before any command: a bad value is one line and exit 2."""
    try:
        get_settings()
    except AppError as exc:
        fail(str(exc), exc.exit_code)


cli.command()(worker.worker)
cli.command()(jobs.enqueue)
cli.command()(jobs.result)
cli.command()(jobs.dequeue)
cli.add_typer(queues, name="queues")
cli.command()(monitor.workers)
cli.command()(monitor.events)
cli.command()(monitor.health)
cli.command()(dev.dev)
cli.command()(loadtest.loadtest)
cli.add_typer(schedules.app, name="schedules")
cli.command()(schedules.scheduler)
cli.add_typer(dead.app, name="dead")
cli.add_typer(workflow_cli)
cli.command()(dashboard.dashboard)


def main() -> None:
    """Run the CLI; a usage error (a bad flag value, a missing argument, an unknown command)
    is one line on stderr and exit 2, like every other error, not a framed box."""
    import sys

    try:
        code = cli(standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        code = 130
    except typer.TyperException as exc:  # typer's click exceptions: usage errors and the like
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(2)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        sub = ctx is not None and ctx.parent is not None
        hint = f" (see `app {ctx.info_name} --help`)" if sub else " (see `app --help`)"
        typer.echo(f"error: {' '.join(str(message).split())}{hint}", err=True)
        code = getattr(exc, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)
