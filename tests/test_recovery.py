"""Nothing lost: crash recovery by heartbeats, graceful shutdown, the supervisor, on every engine."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from app.components.worker.api import WorkerClient
from tests.conftest import until
from tests.test_contract import wait_trail

pytestmark = pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])

FAST = {"worker_offline_after": "1.5", "worker_heartbeat_interval": "0.2"}
TIMEOUT = 30


@pytest.fixture
async def client(make_settings: Any, engine: str) -> Any:
    c = WorkerClient(make_settings(worker_backend=engine, worker_offline_after=1.5))
    yield c
    await c.close()




async def job_field(client: WorkerClient, job_id: str, field: str) -> str | None:
    value = await client.redis.hget(client.keys.job(job_id), field)
    return value.decode() if value else None


async def test_sigkilled_worker_job_is_redelivered_and_counted(
    engine: str, client: WorkerClient, start_worker: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    doomed = start_worker("contract", engine, **FAST)
    job = await client.enqueue("wait_for_file", str(gate))
    await until(lambda: _is(client, job.job_id, "running"), what="job running")
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(10)
    start_worker("contract", engine, **FAST)
    await until(lambda: _attempt_running(client, job.job_id, 2), what="redelivered as attempt 2")
    gate.write_text("go")
    assert await job.result(TIMEOUT) == "released"
    info = await job.info()
    assert info["attempts"] == 2
    events = await wait_trail(client, job.job_id, "job.completed")
    assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.retried", "job.started", "job.completed"]
    assert events[2]["error"].startswith("WorkerLost: ")


async def test_job_that_kills_its_worker_every_time_ends_failed(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    start_worker("contract", engine, "--processes", "2", **FAST)
    job = await client.enqueue("kill_my_worker")
    with pytest.raises(Exception) as failed:
        await job.result(60)
    assert getattr(failed.value, "error_type", None) == "WorkerLost"
    assert (await job.info())["attempts"] == 3
    events = await wait_trail(client, job.job_id, "job.failed")
    assert [e["type"] for e in events].count("job.started") == 3


async def test_long_job_of_a_live_worker_is_never_stolen(
    engine: str, client: WorkerClient, start_worker: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    start_worker("contract", engine, **FAST)
    start_worker("contract", engine, **FAST)
    job = await client.enqueue("wait_for_file", str(gate))
    await until(lambda: _is(client, job.job_id, "running"), what="job running")
    started = time.monotonic()
    while time.monotonic() - started < 4.5:  # three offline thresholds: the other worker's reaper ran many passes
        assert await job_field(client, job.job_id, "attempt") == "1"
        await asyncio.sleep(0.1)
    gate.write_text("go")
    assert await job.result(TIMEOUT) == "released"
    assert (await job.info())["attempts"] == 1


async def test_sigterm_lets_running_jobs_finish(
    engine: str, client: WorkerClient, start_worker: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    worker = start_worker("contract", engine, worker_shutdown_timeout="20")
    job = await client.enqueue("wait_for_file", str(gate))
    await until(lambda: _is(client, job.job_id, "running"), what="job running")
    worker.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)  # the worker is draining; the job is still inside its grace
    gate.write_text("go")
    assert await asyncio.to_thread(worker.proc.wait, TIMEOUT) == 0
    assert await job.result(5) == "released"
    stopped = [e async for e in _events(client, "worker.stopped")]
    assert stopped and stopped[-1]["backend"] == engine


async def test_sigterm_hands_back_what_outlives_the_grace(
    engine: str, client: WorkerClient, start_worker: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    worker = start_worker("contract", engine, worker_shutdown_timeout="0.5")
    job = await client.enqueue("wait_for_file", str(gate))
    await until(lambda: _is(client, job.job_id, "running"), what="job running")
    worker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, TIMEOUT) == 0
    assert await job.status() in ("delayed", "queued")
    gate.write_text("go")
    start_worker("contract", engine)
    assert await job.result(TIMEOUT) == "released"
    assert (await job.info())["attempts"] == 1  # a shutdown is not the job's fault


async def test_supervisor_restarts_a_dead_process_without_touching_siblings(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    start_worker("contract", engine, "--processes", "2", **FAST)
    beats = await until(lambda: _beats(client, 2), what="two heartbeats")
    victim, sibling = beats[0]["pid"], beats[1]["pid"]
    import os

    os.kill(victim, signal.SIGKILL)
    fresh = await until(lambda: _new_pid(client, {victim, sibling}), what="a restarted process")
    assert fresh not in (victim, sibling)
    pids = {b["pid"] for b in await _beats(client, 0) if b.get("state") != "stopped"}
    assert sibling in pids
    job = await client.enqueue("add", 1, 1)
    assert await job.result(TIMEOUT) == 2


async def _is(client: WorkerClient, job_id: str, status: str) -> bool:
    return await job_field(client, job_id, "status") == status


async def _attempt_running(client: WorkerClient, job_id: str, attempt: int) -> bool:
    return await _is(client, job_id, "running") and await job_field(client, job_id, "attempt") == str(attempt)


async def _events(client: WorkerClient, type_: str) -> Any:
    from app.components.worker.events import read_events

    async for e in read_events(client.redis, client.keys, type_=type_):
        yield e


async def _beats(client: WorkerClient, at_least: int) -> list[dict[str, Any]]:
    keys = await client.redis.keys(f"{client.keys.prefix}:heartbeat:contract:*")
    beats = [json.loads(v) for v in await client.redis.mget(keys)] if keys else []
    beats = [b for b in beats if b]
    return beats if len(beats) >= at_least else []


async def _new_pid(client: WorkerClient, old: set[int]) -> int | None:
    for beat in await _beats(client, 0):
        if beat["pid"] not in old:
            return int(beat["pid"])
    return None
