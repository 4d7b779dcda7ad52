"""The engine-contract queue: small tasks whose behaviour the suite checks on every engine."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from app.components.worker import PermanentError, current_job, task


async def add(a: int, b: int) -> int:
    return a + b


def multiply(a: int, b: int) -> int:
    return a * b


async def echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs}


async def whoami() -> dict[str, object]:
    job = current_job()
    return {"job_id": job.job_id, "attempt": job.attempt, "queue": job.queue, "engine": job.engine,
            "enqueued_at": job.enqueued_at}


def whoami_sync() -> dict[str, object]:
    job = current_job()
    return {"job_id": job.job_id, "attempt": job.attempt, "engine": job.engine}


async def always_fails(message: str = "boom") -> None:
    raise ValueError(message)


@task(max_tries=4)
async def always_fails_4() -> None:
    raise ValueError("four times")


async def fails_until_file(path: str) -> str:
    """Fails (retryably) until ``path`` exists: a job a test lets succeed on a later run."""
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist yet")
    return "recovered"


async def permanent() -> None:
    raise PermanentError("cannot work, do not retry")


async def flaky(succeed_on: int) -> int:
    attempt = current_job().attempt
    if attempt < succeed_on:
        raise RuntimeError(f"attempt {attempt} fails")
    return attempt


@task(timeout=0.3)
async def slow_async(seconds: float = 5.0) -> str:
    await asyncio.sleep(seconds)
    return "finished"


@task(timeout=0.3, max_tries=1)
def slow_sync(seconds: float = 2.0) -> str:
    time.sleep(seconds)
    return "finished"


async def returns_unserialisable() -> object:
    return {1, 2, 3}


async def started_at() -> float:
    return time.time()


async def touch(path: str) -> int:
    """Append one line to ``path``: lets a test count executions."""
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    return len(Path(path).read_text().splitlines())


async def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Block until ``path`` exists: a job a test controls (no sleeps in the test)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)
    return "released"


async def chaos_job(directory: str, key: str, ms: int) -> str:
    """Counts its executions (one line per start) and runs for ``ms``: the chaos test's job."""
    with open(os.path.join(directory, key), "a") as fh:
        fh.write(f"{os.getpid()} {current_job().attempt}\n")
    await asyncio.sleep(ms / 1000)
    return key


async def cancels_itself() -> None:
    """Awaits a future that something else cancels: a CancelledError that no shutdown caused."""
    future = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(future.cancel)
    await future


def kill_my_worker() -> None:
    """Dies the hard way, like an OOM kill: the job must not loop forever."""
    os.kill(os.getpid(), signal.SIGKILL)


class WorkerSettings:
    functions = [add, multiply, echo, whoami, whoami_sync, always_fails, always_fails_4, permanent, flaky,
                 slow_async, slow_sync, returns_unserialisable, started_at, touch, wait_for_file,
                 kill_my_worker, chaos_job, cancels_itself, fails_until_file]
    queue_name = "contract"
    max_jobs = 8
    job_timeout = 30
    max_tries = 3
    keep_result = 120
