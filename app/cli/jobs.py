"""`app enqueue`, `app result`, `app dequeue`: jobs from the command line.

Exit codes: 0 the job completed (or was enqueued), 1 it failed / is unknown / timed out,
2 usage, settings or connection errors.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.cli.common import fail, parse_json, parse_pairs, print_json, run, settings
from app.components.worker.api import Job, WorkerClient
from app.components.worker.routing.options import (
    check_fallback,
    check_group,
    check_priority,
    check_selector,
    check_tags,
)
from app.components.worker.routing.options import parse_pairs as route_pairs
from app.components.worker.validation import check_depth, validate_delay, validate_job_id, validate_timeout
from app.core.errors import AppError, JobFailed


def _option(name: str, check: Any, value: Any) -> Any:
    """Validate one option with the API's own rule; a refusal is one line naming the flag."""
    if value is None:
        return None
    try:
        return check(value)
    except AppError as exc:
        fail(f"{name}: {exc}")


async def _report(job: Job, timeout: float | None, info: bool = False) -> int:
    """Print the result (or, with ``info``, the whole record: status, attempts, timings, tags);
    a job's tags also go to stderr as ``tags: k=v,...``."""
    try:
        value = await job.result(timeout)
        code = 0
    except JobFailed as exc:
        typer.echo(f"job {exc.job_id} failed: {exc.error_type}: {exc.message}", err=True)
        value, code = None, 1
    record = await job.info() or {}
    if record.get("tags"):
        typer.echo("tags: " + ",".join(f"{k}={v}" for k, v in record["tags"].items()), err=True)
    if info:
        print_json(record)
    elif code == 0:
        print_json(value)
    return code


def enqueue(
    task: Annotated[str, typer.Argument(help="Task name, e.g. cpu_intensive_task.")],
    params: Annotated[list[str] | None, typer.Argument(help="After --: key=value arguments (values parsed as JSON).")] = None,
    queue: Annotated[str | None, typer.Option(help="Queue (needed when the task name is in several).")] = None,
    job_id: Annotated[str | None, typer.Option(help="Your own job id; refused while that job is queued or running.")] = None,
    delay: Annotated[str | None, typer.Option(help="Start no sooner than this many seconds (0 to 365 days).")] = None,
    kwargs: Annotated[str | None, typer.Option(help="Keyword arguments as one JSON object.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the result and print it as JSON.")] = False,
    timeout: Annotated[str | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
    priority: Annotated[str | None, typer.Option(help="high or low (default: the task's, else low).")] = None,
    group: Annotated[str | None, typer.Option(help="Run only on workers of this group.")] = None,
    selector: Annotated[list[str] | None, typer.Option(help="Run only on workers with these labels: k=v "
                                                       "(repeatable, or comma-separated).")] = None,
    fallback: Annotated[str | None, typer.Option(help="With no healthy target worker: wait, fail or cancel.")] = None,
    tags: Annotated[str | None, typer.Option(help="Tags k=v,k=v: shown in the job's events and result.")] = None,
) -> None:
    """Enqueue TASK; prints the job id, or with --wait the result as JSON (exit 1 if the job failed)."""
    delay_s = _option("--delay", validate_delay, delay)
    timeout_s = _option("--timeout", validate_timeout, timeout)
    job_id = _option("--job-id", validate_job_id, job_id)
    call: dict[str, Any] = {}
    try:
        if kwargs:
            call = parse_json(kwargs, "--kwargs")
            if not isinstance(call, dict):
                fail("--kwargs must be a JSON object like '{\"n\": 1}'")
        call.update(parse_pairs(params or []))
        check_depth(call)
        routing: dict[str, Any] = {
            "_priority": check_priority(priority, "--priority") if priority is not None else None,
            "_worker_group": check_group(group, "--group") if group is not None else None,
            "_worker_selector": check_selector(route_pairs(selector, "--selector"), "--selector") if selector else None,
            "_fallback": check_fallback(fallback, "--fallback") if fallback is not None else None,
            "_tags": check_tags(route_pairs(tags, "--tags"), "--tags") if tags is not None else None,
        }
    except AppError as exc:
        fail(str(exc))

    async def body() -> int:
        client = WorkerClient(settings())
        try:
            job = await client.enqueue(task, _queue=queue, _job_id=job_id, _delay=delay_s, **routing, **call)
            if not wait:
                typer.echo(job.job_id)
                return 0
            return await _report(job, timeout_s)
        finally:
            await client.close()

    raise typer.Exit(run(body))


def result(
    job_id: Annotated[str, typer.Argument(help="The job id that enqueue printed.")],
    wait: Annotated[bool, typer.Option(help="Wait until the job finishes.")] = False,
    timeout: Annotated[str | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
    info: Annotated[bool, typer.Option("--info", help="Print the whole record (status, attempts, timings, "
                                       "tags, error) as JSON.")] = False,
) -> None:
    """Print a job's result as JSON (exit 0), or its error (exit 1)."""
    job_id = _option("job id", validate_job_id, job_id)
    timeout_s = _option("--timeout", validate_timeout, timeout)

    async def body() -> int:
        client = WorkerClient(settings())
        try:
            job = client.job(job_id)
            if not wait:
                status = await job.status()
                if status == "unknown":
                    typer.echo(f"no job {job_id!r}: unknown id, or its result expired", err=True)
                    return 1
                if status not in ("completed", "failed", "cancelled"):
                    typer.echo(f"job {job_id} is {status}: use --wait to wait for it", err=True)
                    return 1
            return await _report(job, timeout_s, info)
        finally:
            await client.close()

    raise typer.Exit(run(body))


def dequeue(
    queue: Annotated[str, typer.Argument(help="Queue to take a waiting job from.")],
    job: Annotated[str | None, typer.Option(help="This job id instead of the next one.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every waiting job of the queue (delayed ones too).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ids as JSON.")] = False,
) -> None:
    """Cancel the next waiting job of QUEUE (or --job ID, or --all): it ends as cancelled, with a
    job.failed event. A running job is not affected."""
    from app.components.worker.dequeue import cancel_next, cancel_waiting

    job = _option("--job", validate_job_id, job)
    if job and all_:
        fail("--job and --all: choose one")

    async def body() -> int:
        client = WorkerClient(settings())
        try:
            client.registry.queue(queue)
            if all_ or job:
                cancelled = await cancel_waiting(client, queue, job)
            else:
                await client._check_engine(queue)
                found = await cancel_next(client, queue)
                cancelled = [found] if found else []
            status = await client.job(job).status() if job and not cancelled else None
        finally:
            await client.close()
        if as_json:
            print_json(cancelled)
        else:
            for job_id in cancelled:
                typer.echo(job_id)
            typer.echo(f"{len(cancelled)} job(s) cancelled on {queue}", err=True)
        if job and not cancelled:
            if status == "running":
                typer.echo(f"job {job!r} is running: dequeue does not stop running jobs", err=True)
            else:
                typer.echo(f"job {job!r} is not waiting on {queue} ({status or 'unknown'})", err=True)
            return 1
        if not cancelled and not all_:
            typer.echo(f"no job waits on {queue}", err=True)
        return 0

    raise typer.Exit(run(body))
