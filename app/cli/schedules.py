"""`app schedules` (list, pause, resume, trigger) and `app scheduler` (run the schedules).

Schedules come from queues' ``WorkerSettings.schedules`` and from the YAML file named by
``--file`` or, without it, ``WORKER_SCHEDULES_FILE``.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli.common import fail, guarded, print_json, run, settings
from app.cli.monitor import console
from app.components.scheduler.loader import Bound, collect
from app.components.scheduler.schedule import format_duration
from app.components.scheduler.scheduler import Scheduler
from app.components.scheduler.store import ScheduleStore, State
from app.components.worker.api import WorkerClient
from app.components.worker.registry import Registry
from app.core.redis import ping

app = typer.Typer(help="Cron and interval schedules: list, pause, resume, trigger.", no_args_is_help=False)

FILE = Annotated[str | None, typer.Option("--file", help="YAML schedules file (default: WORKER_SCHEDULES_FILE).")]
NAME = Annotated[str, typer.Argument(help="Schedule name (see `app schedules`).")]


@guarded
def _load(file: str | None) -> list[Bound]:
    cfg = settings()
    return collect(Registry.discover(cfg.queue_packages), file or cfg.worker_schedules_file)


def _one(items: list[Bound], name: str) -> Bound:
    for item in items:
        if item.name == name:
            return item
    fail(f"unknown schedule {name!r}: known schedules are {', '.join(i.name for i in items) or 'none'}")


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")


def _tick_local(tick: str | None) -> str:
    """A tick (UTC ISO in job ids and events) in local time, for the table."""
    if not tick:
        return "-"
    return datetime.fromisoformat(tick.replace("Z", "+00:00")).astimezone().isoformat(timespec="seconds")


async def _rows(items: list[Bound]) -> list[dict[str, Any]]:
    cfg = settings()
    client = WorkerClient(cfg)
    try:
        await ping(client.redis, cfg)
        store = ScheduleStore(client.redis, client.keys, cfg.worker_events_maxlen, cfg.worker_scheduler_lease_seconds)
        now, states = await store.snapshot(items)
        rows = []
        for item in items:
            state: State = states[item.name]
            outcome = (await store.job_status(state.last_job, item.queue) or "expired") if state.last_job else "-"
            s = item.schedule
            rows.append({
                "name": item.name, "queue": item.queue, "task": item.task, "when": s.when, "origin": item.origin,
                "overlap": s.overlap, "catchup_window_s": s.catchup_window.total_seconds(),
                "misfire_grace_s": s.misfire_grace.total_seconds(), "priority": s.priority,
                "paused": state.paused, "next_run": None if state.paused else item.ticks.next_after(now),
                "last_tick": state.last_tick or None, "last_fired_at": state.last_fired_at,
                "last_job": state.last_job or None, "last_outcome": outcome if state.last_job else None,
                "fired": state.fired, "missed": state.missed, "skipped": state.skipped,
            })
        return rows
    finally:
        await client.close()


@app.callback(invoke_without_command=True)
def schedules(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    file: FILE = None,
) -> None:
    """Each schedule: timing, next run, last run and its outcome, fired/missed/skipped counts."""
    if ctx.invoked_subcommand is not None:
        return
    items = _load(file)
    rows = run(lambda: _rows(items))
    if as_json:
        print_json(rows)
        return
    table = Table("schedule", "queue", "task", "when", "overlap", "catchup", "next run", "last run", "outcome",
                  "fired", "missed", "skipped")
    for r in rows:
        table.add_row(r["name"], r["queue"], r["task"], r["when"], r["overlap"],
                      format_duration_s(r["catchup_window_s"]), "paused" if r["paused"] else _iso(r["next_run"]),
                      _tick_local(r["last_tick"]), r["last_outcome"] or "-", str(r["fired"]), str(r["missed"]),
                      str(r["skipped"]))
    console().print(table)


def format_duration_s(seconds: float) -> str:
    from datetime import timedelta

    return format_duration(timedelta(seconds=seconds)) if seconds else "-"


async def _set_paused(item: Bound, paused: bool) -> None:
    cfg = settings()
    client = WorkerClient(cfg)
    try:
        await ping(client.redis, cfg)
        store = ScheduleStore(client.redis, client.keys, cfg.worker_events_maxlen, cfg.worker_scheduler_lease_seconds)
        await store.set_paused(item, paused)
    finally:
        await client.close()


@app.command()
def pause(name: NAME, file: FILE = None) -> None:
    """Stop firing NAME: its ticks are skipped (not replayed on resume) until `resume`."""
    item = _one(_load(file), name)
    run(lambda: _set_paused(item, True))
    typer.echo(f"schedule {name} paused")


@app.command()
def resume(name: NAME, file: FILE = None) -> None:
    """Fire NAME again from its next tick."""
    item = _one(_load(file), name)
    run(lambda: _set_paused(item, False))
    typer.echo(f"schedule {name} resumed")


@app.command()
def trigger(name: NAME, file: FILE = None) -> None:
    """Enqueue one run of NAME now, with its own job id (sched:NAME:manual:<time>)."""
    items = _load(file)
    item = _one(items, name)

    async def body() -> str:
        cfg = settings()
        client = WorkerClient(cfg)
        try:
            await ping(client.redis, cfg)
            return await Scheduler(cfg, items, client=client).trigger(item.name)
        finally:
            await client.close()

    typer.echo(run(body))


def scheduler(file: FILE = None) -> None:
    """Run the schedules until SIGTERM or Ctrl-C; safe to run on several hosts at once."""
    from app.core.logging import setup_logging

    items = _load(file)
    setup_logging()
    cfg = settings()

    async def body() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        sched = Scheduler(cfg, items)
        try:
            await ping(sched.client.redis, cfg)
            await sched.run(stop)
        finally:
            await sched.close()
        return 0

    raise typer.Exit(run(body))
