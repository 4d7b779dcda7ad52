"""`app events`, `app workers`, `app health`: what operators look at (`app queues`: queues.py)."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.cli.common import fail, guarded, print_json, run, settings
from app.components.worker.events import TYPES, read_events_of
from app.components.worker.health import Thresholds, list_workers_of
from app.components.worker.keys import Keys

JSON = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
PIPED_WIDTH = 10_000  # piped output is for grep/awk: never cut a table at 80 columns


def console() -> Console:
    """A console that wraps to the terminal, and does not cut tables when piped."""
    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)


def local_time(ts: str | int | None) -> str:
    """Unix ms as ISO local time with milliseconds (the table); --json keeps the raw ms."""
    try:
        return datetime.fromtimestamp(int(ts) / 1000).astimezone().isoformat(timespec="milliseconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ts or "-")


def _check_filters(queue: str | None, type_: str | None) -> None:
    """Unknown filter values are a typo, not an empty result: say so and exit 2."""
    if type_ is not None:
        families = sorted({t.partition(".")[0] for t in TYPES})
        if type_ not in TYPES and type_ not in families:
            fail(f"unknown event type {type_!r}: use one of {', '.join(TYPES)} or a family ({', '.join(families)})")
    if queue is not None:
        from app.components.worker.registry import Registry

        registry = Registry.discover(settings().queue_packages)
        if queue not in registry.queues and queue not in registry.broken:
            known = ", ".join(sorted([*registry.queues, *registry.broken])) or "none"
            fail(f"unknown queue {queue!r}: known queues are {known}")


def _queue_names() -> list[str]:
    """The registry's queues: on Redis Cluster each has its own events stream and workers."""
    if not settings().redis_cluster:
        return []
    from app.components.worker.registry import Registry

    return sorted(Registry.discover(settings().queue_packages).queues)


def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Only this type (job.failed) or family (job).")] = None,
    job: Annotated[str | None, typer.Option(help="Only this job id.")] = None,
    as_json: JSON = False,
) -> None:
    """Lifecycle events, oldest first; with --follow, new ones as they happen."""
    from app.core.redis import async_client, ping

    cfg = settings()
    guarded(_check_filters)(queue, type_)

    async def body() -> int:
        redis = async_client(cfg)
        await ping(redis, cfg)
        try:
            async for event in read_events_of(redis, Keys.from_settings(cfg), _queue_names(), queue=queue,
                                              type_=type_, job_id=job, follow=follow, start="$" if follow else "0"):
                if as_json:
                    print_json({k: v for k, v in event.items() if k != "id"})
                else:
                    extra = f" {event['duration_ms']}ms" if event.get("duration_ms") else ""
                    err = f" {event['error']}" if event.get("error") else ""
                    typer.echo(f"{local_time(event['ts'])} {event['type']:<15} {event['queue']:<10} {event['backend']:<8} "
                               f"{event['job_id'] or '-'} {event['task'] or ''} #{event['attempt'] or '-'}"
                               f" {event['worker_id']}{extra}{err}")
        finally:
            await redis.aclose()
        return 0

    try:
        raise typer.Exit(run(body))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


async def _workers(queue: str | None) -> list[dict]:
    """Workers with a heartbeat key, with their states (one Redis connection, closed after)."""
    from app.core.redis import async_client, ping

    cfg = settings()
    redis = async_client(cfg)
    try:
        await ping(redis, cfg)
        return await list_workers_of(redis, Keys.from_settings(cfg), Thresholds.from_settings(cfg), _queue_names(),
                                     queue)
    finally:
        await redis.aclose()


def workers(
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    as_json: JSON = False,
) -> None:
    """Workers seen recently, with their health state by heartbeat age."""
    if queue is not None:
        guarded(_check_filters)(queue, None)
    rows = run(lambda: _workers(queue))
    if as_json:
        keys = ("worker_id", "queue", "engine", "group", "state", "reason", "labels", "last_beat_age_s", "running",
                "done", "failed")
        print_json([{k: r.get(k) for k in keys} for r in rows])
        return
    table = Table("worker", "queue", "engine", "group", "state", "beat age", "running", "done", "failed", "labels")
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in r["labels"].items())
        state = f"{r['state']} ({r['reason']})" if r.get("reason") and r["state"] != "stopped" else r["state"]
        table.add_row(r["worker_id"], r["queue"], r["engine"], r.get("group") or "default", state,
                      f"{r['last_beat_age_s']:.1f}s", str(r["running"]), str(r["done"]), str(r["failed"]), labels)
    console().print(table)
    groups: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r["queue"], r.get("group") or "default")
        groups[key] = groups.get(key, 0) + (r["state"] == "healthy")
    if groups:
        typer.echo("healthy workers per group: " + ", ".join(
            f"{queue}/{group} {count}" for (queue, group), count in sorted(groups.items())))


def _age(row: dict) -> str:
    return f"{row['last_beat_age_s']:.0f}s"


def health(queue: Annotated[str, typer.Argument(help="Queue to check.")]) -> None:
    """Exit 0 when at least one healthy worker serves QUEUE, else 1 with the reason (for health checks)."""
    from app.components.worker.registry import Registry

    guarded(_check_filters)(queue, None)
    broken = Registry.discover(settings().queue_packages).broken.get(queue)
    if broken is not None:
        fail(broken.reason)
    rows = run(lambda: _workers(queue))
    healthy = [r for r in rows if r["state"] == "healthy"]
    if healthy:
        typer.echo(f"{queue}: {len(healthy)} healthy worker(s)")
        raise typer.Exit(0)
    if not rows:
        typer.echo(f"{queue}: no worker has a heartbeat: start one with `app worker {queue}`", err=True)
    else:
        states = ", ".join(f"{r['worker_id']} {r['state']} ({r.get('reason') or _age(r)})" for r in rows)
        typer.echo(f"{queue}: no healthy worker: {states}", err=True)
    raise typer.Exit(1)
