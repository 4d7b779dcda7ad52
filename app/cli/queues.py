"""`app queues`: every queue at a glance; `app queues pause|resume QUEUE`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from app.cli.common import print_json, run, settings
from app.cli.monitor import JSON, console
from app.components.worker.api import WorkerClient

queues = typer.Typer(help="Each queue: engine, ready, delayed, running, failed, rate, workers; pause and resume.",
                     no_args_is_help=False)

QUEUE = Annotated[str, typer.Argument(help="Queue name.")]


def _waiting(row: dict) -> str:
    """'gpu 3 (1 high), default 2' for the routed jobs waiting per group."""
    parts = []
    for target, counts in row.get("waiting_by_group", {}).items():
        high = f" ({counts['high']} high)" if counts["high"] else ""
        parts.append(f"{target} {counts['high'] + counts['low']}{high}")
    return ", ".join(parts)


@queues.callback(invoke_without_command=True)
def listing(ctx: typer.Context, as_json: JSON = False) -> None:
    """Each queue: engine, ready, delayed, running, failed (dead), rate, healthy workers, paused,
    and the routed jobs waiting per worker group and priority."""
    if ctx.invoked_subcommand is not None:
        return
    from app.components.worker.metrics import queue_metrics

    async def body() -> list[dict]:
        client = WorkerClient(settings())
        try:
            from app.core.redis import ping

            await ping(client.redis, client.settings)
            return await queue_metrics(client)
        finally:
            await client.close()

    rows = run(body)
    if as_json:
        print_json(rows)
        return
    broken = any(r.get("error") for r in rows)
    columns = ["queue", "engine", "ready", "delayed", "running", "failed", "done/min", "failed/min", "workers",
               "paused", "waiting per group"]
    table = Table(*columns, *(["error"] if broken else []))
    for r in rows:
        if r.get("error"):
            table.add_row(r["queue"], "-", "-", "-", "-", "-", "-", "-", str(r["workers"]), "-", "-", r["error"])
            continue
        running = str(r["running"]) + (f"/{r['max_concurrency']} max" if r.get("max_concurrency") else "")
        table.add_row(r["queue"], r["engine"], str(r["ready"]), str(r["delayed"]), running,
                      str(r["failed"]), str(r["per_minute"]["completed"]), str(r["per_minute"]["failed"]),
                      str(r["workers"]), "yes" if r.get("paused") else "", _waiting(r), *([""] if broken else []))
    console().print(table)


def _switch(queue: str, paused: bool) -> None:
    from app.components.worker.routing.pause import pause, resume

    async def body() -> int:
        client = WorkerClient(settings())
        try:
            client.registry.queue(queue)
            changed = await (pause if paused else resume)(client.redis, client.keys, queue)
        finally:
            await client.close()
        if paused:
            typer.echo(f"queue {queue} paused: running jobs finish, nothing new starts, enqueues wait"
                       if changed else f"queue {queue} was already paused")
        else:
            typer.echo(f"queue {queue} resumed" if changed else f"queue {queue} was not paused")
        return 0

    raise typer.Exit(run(body))


@queues.command()
def pause(queue: QUEUE) -> None:
    """Stop starting jobs of QUEUE on every worker and engine; running jobs finish; enqueues wait."""
    _switch(queue, True)


@queues.command()
def resume(queue: QUEUE) -> None:
    """Start QUEUE's jobs again, the waiting ones first, in order."""
    _switch(queue, False)
