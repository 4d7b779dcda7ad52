"""`app loadtest`: push N jobs through a queue's live workers and report what they did.

It enqueues in pipelined batches (``WorkerClient.enqueue_many``), optionally paced to a rate,
follows the event stream from the id just before the first job, and ends when every job has
a terminal event (``job.completed`` or ``job.failed``; a retried job counts its final one).
It starts no worker: it measures the workers the operator runs, on whatever engine they serve
the queue with. Figures come from the events alone: latency is ``job.started`` minus the
enqueue time carried by ``job.enqueued``; run time is the ``duration_ms`` of the terminal event.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from app.cli.common import fail, parse_pairs, print_json, run, settings
from app.components.worker.api import JobRequest, WorkerClient
from app.components.worker.envelope import new_job_id
from app.components.worker.events import read_events
from app.components.worker.health import Thresholds, list_workers_of
from app.components.worker.validation import validate_timeout
from app.core.errors import AppError, ResultTimeout

TASKS = {
    "noop": ("noop",),
    "cpu": ("cpu_intensive_task",),
    "io": ("io_simulation_task",),
    "memory": ("memory_operations_task",),
    "failure": ("failure_testing_task",),
    "mixed": ("cpu_intensive_task", "io_simulation_task", "memory_operations_task", "failure_testing_task"),
}
BATCH = 1000          # jobs per enqueue_many call (one pipeline each) when not paced
PACED_TICKS_S = 20    # with --rate, chunks per second
TERMINAL = ("job.completed", "job.failed")


@dataclass
class Tally:
    """What the event stream said about the jobs of this run."""

    ids: set[str]
    enqueued_at: dict[str, int] = field(default_factory=dict)
    started_at: dict[str, int] = field(default_factory=dict)
    latency_ms: list[int] = field(default_factory=list)
    runtime_ms: list[int] = field(default_factory=list)
    by_worker: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    failed: int = 0
    first_start: int | None = None
    last_end: int | None = None

    @property
    def finished(self) -> int:
        return self.completed + self.failed

    def add(self, event: dict[str, str]) -> None:
        job_id = event.get("job_id", "")
        if job_id not in self.ids:
            return
        kind, ts = event["type"], int(event.get("ts") or 0)
        if kind == "job.enqueued":
            self.enqueued_at[job_id] = ts
        elif kind == "job.started":
            if job_id not in self.started_at:  # a retried job's latency is to its first start
                self.started_at[job_id] = ts
                if job_id in self.enqueued_at:
                    self.latency_ms.append(ts - self.enqueued_at[job_id])
            self.first_start = ts if self.first_start is None else min(self.first_start, ts)
        elif kind in TERMINAL:
            self.ids.discard(job_id)  # one terminal event per job, even if the stream repeats
            if kind == "job.completed":
                self.completed += 1
            else:
                self.failed += 1
                self.errors[event.get("error") or "unknown error"] += 1
            if event.get("duration_ms"):
                self.runtime_ms.append(int(event["duration_ms"]))
            self.by_worker[event.get("worker_id") or "?"] += 1
            self.last_end = ts if self.last_end is None else max(self.last_end, ts)


def percentiles(values: list[int]) -> dict[str, float | None]:
    """p50/p95/p99 by nearest rank; None when there is nothing to rank."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> float:
        return float(ordered[max(0, min(n - 1, -(-int(p * n) // 100) - 1))])

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99)}


def build_requests(client: WorkerClient, queue: str, kind: str, jobs: int,
                   params: dict[str, Any]) -> list[JobRequest]:
    """Requests with their ids chosen here, so events can be matched before enqueue returns.

    ``key=value`` pairs go to every task that takes that parameter; a key no task of the
    type takes is refused up front, rather than failing every job in the worker.
    """
    tasks = [client.registry.task(name, queue) for name in TASKS[kind]]
    accepted = {spec.name: set(inspect.signature(spec.func).parameters) for spec in tasks}
    unknown = sorted(set(params) - set().union(*accepted.values()))
    if unknown:
        takes = "; ".join(f"{name}({', '.join(sorted(p)) or ''})" for name, p in accepted.items())
        raise AppError(f"no {kind} task takes {', '.join(unknown)}: parameters are {takes}")
    kwargs = {spec.name: {k: v for k, v in params.items() if k in accepted[spec.name]} for spec in tasks}
    return [
        JobRequest(tasks[i % len(tasks)].name, kwargs=kwargs[tasks[i % len(tasks)].name], queue=queue,
                   job_id=new_job_id())
        for i in range(jobs)
    ]


async def serving_engine(client: WorkerClient, queue: str) -> str:
    """The engine of the healthy workers of ``queue``; fails at once when there are none."""
    rows = await list_workers_of(client.redis, client.keys, Thresholds.from_settings(client.settings), [queue], queue)
    engines = {r["engine"] for r in rows if r["state"] == "healthy"}
    if not engines:
        raise AppError(f"no healthy worker serves queue {queue!r}: start one with `app worker {queue}`")
    if len(engines) > 1:
        raise AppError(f"queue {queue!r} is served by workers on several engines ({', '.join(sorted(engines))}): "
                       "stop all but one engine's workers")
    return engines.pop()


async def enqueue_all(client: WorkerClient, requests: list[JobRequest], rate: float | None) -> tuple[int, float]:
    """Enqueue in batches (paced to ``rate`` jobs/s when given); returns (accepted, seconds)."""
    chunk = max(1, int(rate / PACED_TICKS_S)) if rate else BATCH
    accepted = 0
    started = time.perf_counter()
    for offset in range(0, len(requests), chunk):
        if rate:
            due = started + offset / rate
            pause = due - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
        handles = await client.enqueue_many(requests[offset:offset + chunk])
        accepted += sum(1 for h in handles if h is not None)
    return accepted, time.perf_counter() - started


class Progress:
    """A live bar (done, failed, jobs/s) on a terminal; nothing otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("[bold]loadtest"), BarColumn(), MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"), TextColumn("{task.fields[rate]} jobs/s"),
            TimeElapsedColumn(), transient=True,
        )
        self.task = self.bar.add_task("jobs", total=total, failed=0, rate="-")
        self.started = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, tally: Tally) -> None:
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-6)
            self.bar.update(self.task, completed=tally.finished, failed=tally.failed,
                            rate=f"{tally.finished / elapsed:,.0f}")


async def follow(client: WorkerClient, queue: str, start: str, tally: Tally, total: int, progress: Progress) -> None:
    async for event in read_events(client.redis, client.keys, queue=queue, start=start, follow=True, block_ms=200):
        tally.add(event)
        progress.update(tally)
        if tally.finished >= total:
            return


def report(tally: Tally, jobs: int, accepted: int, enqueue_s: float) -> dict[str, Any]:
    span_ms = (tally.last_end or 0) - (tally.first_start or 0)
    return {
        "jobs": jobs,
        "completed": tally.completed,
        "failed": tally.failed,
        "enqueue_jobs_s": round(accepted / enqueue_s, 1) if enqueue_s > 0 else None,
        "throughput_jobs_s": round(tally.completed / max(span_ms, 1) * 1000, 1) if tally.first_start else 0.0,
        "latency_ms": percentiles(tally.latency_ms),
        "runtime_ms": percentiles(tally.runtime_ms),
        "by_worker": dict(tally.by_worker.most_common()),
        "errors": dict(tally.errors.most_common()),
    }


def show(result: dict[str, Any], queue: str, engine: str, kind: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(p: dict[str, float | None]) -> str:
        return " / ".join("-" if p[k] is None else f"{p[k]:g}" for k in ("p50", "p95", "p99"))

    console = Console(highlight=False) if sys.stdout.isatty() else Console(highlight=False, width=10_000)
    console.print(f"[bold]{result['jobs']}[/] {kind} jobs on queue {queue} ({engine}): "
                  f"{result['completed']} completed, {result['failed']} failed")
    console.print(f"enqueue     {result['enqueue_jobs_s'] or 0:,.0f} jobs/s")
    console.print(f"throughput  {result['throughput_jobs_s']:,.0f} jobs/s (first start to last end)")
    console.print(f"latency ms  {ms(result['latency_ms'])}  (enqueue to start, p50 / p95 / p99)")
    console.print(f"runtime ms  {ms(result['runtime_ms'])}  (p50 / p95 / p99)")
    table = Table("worker", "jobs")
    for worker_id, count in result["by_worker"].items():
        table.add_row(worker_id, str(count))
    console.print(table)
    if result["errors"]:
        errors = Table("error", "jobs")
        for error, count in result["errors"].items():
            errors.add_row(error, str(count))
        console.print(errors)


def loadtest(
    params: Annotated[list[str] | None, typer.Argument(help="After --: key=value task arguments (values parsed as JSON).")] = None,
    queue: Annotated[str, typer.Option(help="Queue whose workers run the jobs.")] = "load_test",
    type_: Annotated[str, typer.Option("--type", help="noop, cpu, io, memory, failure or mixed (round-robin of the four).")] = "noop",
    jobs: Annotated[int, typer.Option(min=1, help="How many jobs.")] = 1000,
    rate: Annotated[float | None, typer.Option(min=0.001, help="Enqueue at this many jobs/s (default: as fast as possible).")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Give up after this many seconds (exit 1).")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Enqueue JOBS jobs for the running workers of QUEUE, follow their events, report figures."""
    if type_ not in TASKS:
        fail(f"--type {type_!r} is invalid: use one of {', '.join(TASKS)}")
    if rate is not None and not math.isfinite(rate):
        fail(f"--rate must be a finite number of jobs per second, not {rate}")
    try:
        timeout = validate_timeout(timeout)
    except AppError as exc:
        fail(f"--timeout: {exc}")
    items = params or []
    stray = [item for item in items if item.startswith("--")]
    if stray:
        fail(f"{stray[0]!r} came after --: put options before -- and only key=value task arguments after it")
    try:
        call = parse_pairs(items)
    except AppError as exc:
        fail(str(exc))
    cfg = settings()
    live_bar = sys.stdout.isatty() and not as_json

    async def body() -> tuple[dict[str, Any], str]:
        from app.core.redis import ping

        probe = WorkerClient(cfg)
        try:
            await ping(probe.redis, cfg)
            probe.registry.queue(queue)
            engine = await serving_engine(probe, queue)
        finally:
            await probe.close()
        # Produce for the engine the workers serve, whatever this shell's settings say.
        os.environ["WORKER_BACKEND_" + queue.upper().replace("-", "_")] = engine
        client = WorkerClient(cfg)
        try:
            requests = build_requests(client, queue, type_, jobs, call)
            tally = Tally({r.job_id for r in requests if r.job_id})
            last = await client.redis.xrevrange(client.keys.events, count=1)
            start = (last[0][0].decode() if isinstance(last[0][0], bytes) else last[0][0]) if last else "0-0"
            with Progress(jobs, live_bar) as progress:
                follower = asyncio.create_task(follow(client, queue, start, tally, jobs, progress))
                try:
                    accepted, enqueue_s = await enqueue_all(client, requests, rate)
                    remaining = max(0.0, timeout - enqueue_s)
                    await asyncio.wait_for(asyncio.shield(follower), remaining)
                except TimeoutError:
                    missing = jobs - tally.finished
                    raise ResultTimeout(
                        f"{missing} of {jobs} jobs had no terminal event within {timeout:g}s "
                        f"({tally.completed} completed, {tally.failed} failed): are the {queue} workers busy or stuck?"
                    ) from None
                finally:
                    follower.cancel()
                    await asyncio.gather(follower, return_exceptions=True)
            return report(tally, jobs, accepted, enqueue_s), engine
        finally:
            await client.close()

    try:
        result, engine = run(body)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if as_json:
        print_json(result)
    else:
        show(result, queue, engine, type_)
