"""A queue with lifecycle hooks and middleware, to check they behave alike on every engine.

Worker-side hooks record into Redis (HOOKS_LOG_URL, set only for workers); producer-side
hooks record in memory of the process that enqueues (the test).
"""

from __future__ import annotations

import os
from typing import Any

import redis

from app.components.worker import JobContext, Middleware, SkipJob, WorkerContext, current_job, task


def _log(name: str, entry: str) -> None:
    url = os.environ.get("HOOKS_LOG_URL")
    if url:
        client = redis.Redis.from_url(url)
        client.rpush(f"{os.environ['WORKER_KEY_PREFIX']}:hooklog:{name}", entry)
        client.close()


class Recorder(Middleware):
    producer_calls: list[tuple[str, str]] = []

    def worker_start(self, worker: WorkerContext) -> None:
        _log("worker", "worker_start")

    def worker_stop(self, worker: WorkerContext) -> None:
        _log("worker", "worker_stop")

    def before_enqueue(self, job: dict[str, Any]) -> None:
        Recorder.producer_calls.append(("before_enqueue", job["job_id"]))

    def after_enqueue(self, job: dict[str, Any]) -> None:
        Recorder.producer_calls.append(("after_enqueue", job["job_id"]))

    def before_process(self, job: JobContext) -> None:
        _log(job.job_id, f"before_process:{job.attempt}")

    async def after_process(self, job: JobContext, result: Any) -> None:  # async hooks work too
        _log(job.job_id, f"after_process:{job.attempt}")

    def on_retry(self, job: JobContext, error: BaseException, delay: float) -> None:
        _log(job.job_id, f"on_retry:{job.attempt}")

    def on_failure(self, job: JobContext, error: BaseException) -> None:
        _log(job.job_id, f"on_failure:{job.attempt}")


class Skipper(Middleware):
    def before_process(self, job: JobContext) -> None:
        if job.task == "skipped_task":
            raise SkipJob("tenant is suspended")


class Exploder(Middleware):
    """Raises in every hook: jobs must complete normally anyway."""

    def _boom(self, *args: Any) -> None:
        raise RuntimeError("middleware bug")

    worker_start = worker_stop = before_enqueue = after_enqueue = _boom
    before_process = after_process = on_retry = on_failure = _boom


async def open_pool(ctx: WorkerContext) -> None:
    ctx["pool"] = {"pid": os.getpid(), "open": True}
    _log("worker", "startup")


def close_pool(ctx: WorkerContext) -> None:
    ctx["pool"]["open"] = False
    _log("worker", f"shutdown:open={ctx['pool']['open']}")


async def uses_pool(ctx: JobContext) -> dict[str, Any]:
    """Asks for its context by annotation; gets what on_startup stored."""
    return {"pool": ctx.state["pool"], "job_id": ctx.job_id, "pid": os.getpid()}


def uses_pool_sync() -> dict[str, Any]:
    return {"pool": current_job().state["pool"]}


async def ok() -> str:
    return "ok"


async def fails_first() -> int:
    if current_job().attempt == 1:
        raise RuntimeError("first attempt fails")
    return current_job().attempt


@task(max_tries=2)
async def fails_every_time() -> None:
    raise RuntimeError("always")


async def skipped_task() -> str:
    return "must not run"


class WorkerSettings:
    functions = [uses_pool, uses_pool_sync, ok, fails_first, fails_every_time, skipped_task]
    queue_name = "hooks"
    on_startup = open_pool
    on_shutdown = close_pool
    middleware = [Recorder, Exploder, Skipper]
