"""Extension points on every engine: lifecycle hooks, job context, user middleware."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.components.worker.api import WorkerClient
from app.core.errors import JobFailed
from tests.queues.hooks import Recorder
from tests.test_contract import wait_trail

pytestmark = pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
TIMEOUT = 30


@pytest.fixture
def hooks_worker(start_worker: Any, engine: str, redis_url: str) -> Any:
    return start_worker("hooks", engine, hooks_log_url=redis_url)


async def log(client: WorkerClient, name: str) -> list[str]:
    return [v.decode() for v in await client.redis.lrange(f"{client.keys.prefix}:hooklog:{name}", 0, -1)]


async def log_until(client: WorkerClient, name: str, length: int) -> list[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while len(entries := await log(client, name)) < length:
        assert loop.time() < deadline, f"hook log {name}: {entries}"
        await asyncio.sleep(0.02)
    return entries


async def test_on_startup_resource_seen_by_tasks_and_closed_on_sigterm(
    engine: str, client: WorkerClient, hooks_worker: Any
) -> None:
    job = await client.enqueue("uses_pool")
    sync_job = await client.enqueue("uses_pool_sync")
    value = await job.result(TIMEOUT)
    assert value["pool"] == {"pid": value["pid"], "open": True}
    assert value["job_id"] == job.job_id
    assert (await sync_job.result(TIMEOUT))["pool"]["open"] is True
    assert hooks_worker.stop() == 0
    assert await log(client, "worker") == ["startup", "worker_start", "worker_stop", "shutdown:open=False"]


async def test_hook_sequences_are_the_same_on_every_engine(
    engine: str, client: WorkerClient, hooks_worker: Any
) -> None:
    Recorder.producer_calls.clear()
    ok = await client.enqueue("ok")
    retried = await client.enqueue("fails_first")
    failed = await client.enqueue("fails_every_time")
    assert await ok.result(TIMEOUT) == "ok"  # the Exploder raised in every hook meanwhile
    assert await retried.result(TIMEOUT) == 2
    with pytest.raises(JobFailed):
        await failed.result(TIMEOUT)
    assert await log_until(client, ok.job_id, 2) == ["before_process:1", "after_process:1"]
    assert await log_until(client, retried.job_id, 4) == [
        "before_process:1", "on_retry:1", "before_process:2", "after_process:2"]
    assert await log_until(client, failed.job_id, 4) == [
        "before_process:1", "on_retry:1", "before_process:2", "on_failure:2"]
    assert Recorder.producer_calls[:2] == [("before_enqueue", ok.job_id), ("after_enqueue", ok.job_id)]


async def test_skip_ends_the_job_with_its_reason_and_a_terminal_event(
    engine: str, client: WorkerClient, hooks_worker: Any
) -> None:
    job = await client.enqueue("skipped_task")
    with pytest.raises(JobFailed) as skipped:
        await job.result(TIMEOUT)
    assert skipped.value.error_type == "SkipJob" and skipped.value.message == "tenant is suspended"
    assert await job.status() == "cancelled"
    events = await wait_trail(client, job.job_id, "job.failed")
    assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.failed"]
    assert events[-1]["error"] == "SkipJob: tenant is suspended"
    assert await log_until(client, job.job_id, 2) == ["before_process:1", "on_failure:1"]
