"""The `app` command."""

from __future__ import annotations

import typer

from app.cli import dev, jobs, loadtest, monitor, worker
from app.cli.common import fail
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
cli.command()(monitor.queues)
cli.command()(monitor.workers)
cli.command()(monitor.events)
cli.command()(monitor.health)
cli.command()(dev.dev)
cli.command()(loadtest.loadtest)


def main() -> None:
    cli()
