"""The fault-injection queue: jobs that leave a trail of their executions on disk, and tasks
that cancel themselves. Used by tests/test_faults_chaos.py on every engine."""

from __future__ import annotations

import asyncio
import os

from app.components.worker import current_job, task


def _note(directory: str, key: str, what: str) -> None:
    with open(os.path.join(directory, key), "a") as fh:
        fh.write(f"{what} {os.getpid()} {current_job().attempt}\n")


async def fault_step(directory: str, key: str, ms: int) -> str:
    """One line when an execution starts, one when it ends: counts runs, including runs the
    layer no longer owns (a frozen or cut-off worker that goes on after waking)."""
    _note(directory, key, "start")
    try:
        await asyncio.sleep(ms / 1000)
    finally:  # also when interrupted (a hand-back at shutdown): the execution is over
        _note(directory, key, "end")
    return key


@task(max_tries=2)
async def cancels_itself() -> None:
    """Awaits something that gets cancelled: a CancelledError that no shutdown caused."""
    inner = asyncio.ensure_future(asyncio.sleep(30))
    asyncio.get_running_loop().call_later(0.01, inner.cancel)
    await inner


@task(max_tries=2)
async def raises_cancelled() -> None:
    raise asyncio.CancelledError("raised by the task itself")


class WorkerSettings:
    functions = [fault_step, cancels_itself, raises_cancelled]
    queue_name = "chaos"
    max_jobs = 4
    job_timeout = 30
    max_tries = 3
    keep_result = 600
