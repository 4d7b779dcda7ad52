"""`app enqueue`, `app result`, `app dequeue`: jobs from the command line.

Exit codes: 0 the job completed (or was enqueued), 1 it failed / is unknown / timed out,
2 usage, settings or connection errors.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.cli.common import fail, parse_json, parse_pairs, print_json, run, settings
from app.components.worker.api import Job, WorkerClient
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


async def _report(job: Job, timeout: float | None) -> int:
    try:
        value = await job.result(timeout)
    except JobFailed as exc:
        typer.echo(f"job {exc.job_id} failed: {exc.error_type}: {exc.message}", err=True)
        return 1
    print_json(value)
    return 0


def enqueue(
    task: Annotated[str, typer.Argument(help="Task name, e.g. cpu_intensive_task.")],
    params: Annotated[list[str] | None, typer.Argument(help="After --: key=value arguments (values parsed as JSON).")] = None,
    queue: Annotated[str | None, typer.Option(help="Queue (needed when the task name is in several).")] = None,
    job_id: Annotated[str | None, typer.Option(help="Your own job id; refused while that job is queued or running.")] = None,
    delay: Annotated[str | None, typer.Option(help="Start no sooner than this many seconds (0 to 365 days).")] = None,
    kwargs: Annotated[str | None, typer.Option(help="Keyword arguments as one JSON object.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the result and print it as JSON.")] = False,
    timeout: Annotated[str | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
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
    except AppError as exc:
        fail(str(exc))

    async def body() -> int:
        client = WorkerClient(settings())
        try:
            job = await client.enqueue(task, _queue=queue, _job_id=job_id, _delay=delay_s, **call)
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
            return await _report(job, timeout_s)
        finally:
            await client.close()

    raise typer.Exit(run(body))


def dequeue(
    queue: Annotated[str, typer.Argument(help="Queue to take waiting jobs from.")],
    job: Annotated[str | None, typer.Option(help="Only this job id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ids as JSON.")] = False,
) -> None:
    """Cancel waiting jobs of QUEUE (or one job): they end as cancelled, with a job.failed event."""
    from app.components.worker.dequeue import cancel_waiting

    job = _option("--job", validate_job_id, job)

    async def body() -> int:
        client = WorkerClient(settings())
        try:
            client.registry.queue(queue)
            cancelled = await cancel_waiting(client, queue, job)
        finally:
            await client.close()
        if as_json:
            print_json(cancelled)
        else:
            for job_id in cancelled:
                typer.echo(job_id)
            typer.echo(f"{len(cancelled)} job(s) cancelled on {queue}", err=True)
        if job and not cancelled:
            typer.echo(f"job {job!r} is not waiting on {queue} (unknown, running or finished)", err=True)
            return 1
        return 0

    raise typer.Exit(run(body))
