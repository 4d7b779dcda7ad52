"""`app dead`: the jobs that ended failed, kept per queue (WORKER_DEAD_TTL_SECONDS); retry, purge.

    app dead [--queue Q] [--json] [--limit N]     list, most recent failure first
    app dead retry JOB_ID | --all [--queue Q]     enqueue again (same id, task, arguments)
    app dead purge [--queue Q] [--job ID]         delete entries with their records

Exit codes: 0 done, 1 a job id that is not dead, 2 usage, settings or connection errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from app.cli.common import fail, print_json, run, settings
from app.cli.monitor import console
from app.components.worker.api import WorkerClient
from app.components.worker.routing.dead import NotDead, count_dead, list_dead, purge_dead, retry_all, retry_dead
from app.core.redis import ping

T = TypeVar("T")
ERROR_WIDTH = 120  # the table shows the start of each error; --json has it whole

app = typer.Typer(help="Jobs that ended failed, kept per queue: list them, retry them, purge them.",
                  invoke_without_command=True, no_args_is_help=False)

QUEUE = Annotated[str | None, typer.Option("--queue", help="Only this queue.")]


def _known(client: WorkerClient, queue: str | None) -> list[str]:
    """The queues to look at; an unknown ``--queue`` is a typo, not an empty result."""
    known = sorted([*client.registry.queues, *client.registry.broken])
    if queue is None:
        return known
    if queue not in known:
        fail(f"unknown queue {queue!r}: known queues are {', '.join(known) or 'none'}")
    return [queue]


def _with_client(body: Callable[[WorkerClient], Awaitable[T]]) -> T:
    async def main() -> T:
        client = WorkerClient(settings())
        try:
            await ping(client.redis, client.settings)
            return await body(client)
        finally:
            await client.close()

    return run(main)


def _age(ms: int) -> str:
    seconds = max(0, ms) // 1000
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@app.callback(invoke_without_command=True)
def dead(
    ctx: typer.Context,
    queue: QUEUE = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most this many, most recent first.")] = 100,
) -> None:
    """List dead jobs (job id, queue, task, attempts, error, age); see the retry and purge commands."""
    if ctx.invoked_subcommand is not None:
        return
    ttl = settings().worker_dead_ttl_seconds

    async def body(client: WorkerClient) -> tuple[list[dict[str, Any]], int, int]:
        queues = _known(client, queue)
        rows = await list_dead(client.redis, client.keys, queues, limit=limit, ttl=ttl)
        total = await count_dead(client.redis, client.keys, queues)
        seconds, micros = await client.redis.time()
        return rows, total, int(seconds) * 1000 + int(micros) // 1000

    rows, total, now = _with_client(body)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no dead jobs")
        return
    table = Table("job id", "queue", "task", "attempts", "error", "age",
                  caption=f"{len(rows)} of {total} dead job(s)" if total > len(rows) else None)
    for r in rows:
        error = f"{r['error_type'] or 'Error'}: {r['error'] or ''}"
        error = error if len(error) <= ERROR_WIDTH else error[:ERROR_WIDTH - 3] + "..."
        table.add_row(r["job_id"], r["queue"], r["task"], str(r["attempts"]), error, _age(now - r["finished_at"]))
    console().print(table)


@app.command()
def retry(
    job_id: Annotated[str | None, typer.Argument(help="The dead job to run again.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Retry every dead job (of --queue, or of every queue).")] = False,
    queue: Annotated[str | None, typer.Option("--queue", help="With --all: only this queue.")] = None,
) -> None:
    """Enqueue a dead job again (same id, task, queue and arguments; a fresh run, try 1)."""
    if job_id is not None and all_:
        fail("give a JOB_ID or --all, not both")
    if job_id is None and not all_:
        fail("give the JOB_ID to retry (see `app dead`), or --all")
    if job_id is not None and queue is not None:
        fail("--queue goes with --all: a JOB_ID names its own queue")

    if job_id is not None:
        async def one(client: WorkerClient) -> str:
            return (await retry_dead(client, job_id)).job_id

        typer.echo(f"retried {_with_client(one)}")
        return

    async def every(client: WorkerClient) -> int:
        _known(client, queue)
        return await retry_all(client, queue)

    typer.echo(f"retried {_with_client(every)} dead job(s)")


@app.command()
def purge(
    queue: Annotated[str | None, typer.Option("--queue", help="Only this queue.")] = None,
    job: Annotated[str | None, typer.Option("--job", help="Only this job id.")] = None,
) -> None:
    """Delete dead jobs with their records and results (all of them, of --queue, or --job)."""

    async def body(client: WorkerClient) -> int:
        if queue is not None:
            _known(client, queue)
        keys, where_queue = await client.keys_of(job, queue) if job is not None else (client.keys, queue)  # Cluster: its queue
        removed = await purge_dead(client.redis, keys, where_queue, job)
        if job is not None and not removed:
            where = f" of queue {queue!r}" if queue is not None else ""
            raise NotDead(f"job {job!r} is not in the dead set{where}: nothing purged (see `app dead`)")
        return removed

    typer.echo(f"purged {_with_client(body)} dead job(s)")
