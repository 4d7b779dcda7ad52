"""Routing on every engine: strict priorities, global max_concurrency leases, worker groups and
label selectors with fallback, pause/resume, rate limits. Real Redis, real worker processes."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from app.components.worker.api import WorkerClient
from app.components.worker.events import read_events
from app.components.worker.routing.pause import pause, resume
from app.core.errors import JobFailed
from tests.conftest import until

pytestmark = pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])

TIMEOUT = 30


async def events_of(client: WorkerClient, queue: str, type_: str | None = None) -> list[dict[str, str]]:
    return [e async for e in read_events(client.redis, client.keys, queue=queue, type_=type_)]


def max_overlap(events: list[dict[str, str]]) -> int:
    """Most jobs running at once, from the started/completed events (Redis's clock)."""
    marks = []
    for e in events:
        if e["type"] == "job.started":
            marks.append((int(e["ts"]), 1))
        elif e["type"] in ("job.completed", "job.failed", "job.retried"):
            marks.append((int(e["ts"]), -1))
    running = peak = 0
    for _, step in sorted(marks, key=lambda m: (m[0], m[1])):  # an end before a start at the same ms
        running += step
        peak = max(peak, running)
    return peak


async def test_high_jobs_enqueued_last_start_first_fifo_within_a_level(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    low = [await client.enqueue("step", f"low{i}", _queue="routed") for i in range(4)]
    high = [await client.enqueue("step", f"high{i}", _queue="routed", _priority="high") for i in range(3)]
    by_task = await client.enqueue("urgent", "urgent")  # @task(priority="high")
    start_worker("routed", engine, "--threads", "1")
    for job in [*low, *high, by_task]:
        await job.result(TIMEOUT)
    started = [e["job_id"] for e in await events_of(client, "routed", "job.started")]
    expected = [j.job_id for j in (*high, by_task, *low)]
    assert started == expected


async def test_max_concurrency_holds_across_processes_and_a_killed_workers_slot_frees(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    start_worker("routed", engine, "--processes", "4", "--threads", "2", WORKER_MAX_CONCURRENCY_ROUTED="2")
    jobs = [await client.enqueue("hold", 0.2, _queue="routed") for _ in range(8)]
    for job in jobs:
        await job.result(TIMEOUT)
    events = await events_of(client, "routed")
    assert max_overlap(events) == 2
    assert await client.redis.hlen(client.keys.leases("routed")) == 0


async def test_a_killed_workers_lease_frees_once_it_is_offline(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    settings = {"WORKER_MAX_CONCURRENCY_ROUTED": "1", "WORKER_OFFLINE_AFTER": "2", "WORKER_WARNING_AFTER": "0.5",
                "WORKER_UNHEALTHY_AFTER": "1"}
    first = start_worker("routed", engine, **settings)
    stuck = await client.enqueue("hold_first", 120, _queue="routed")
    await until(lambda: client.redis.hlen(client.keys.leases("routed")), what="the lease of the first job")
    waiting = await client.enqueue("step", "next", _queue="routed")
    first.stop(signal.SIGKILL)
    start_worker("routed", engine, **settings)
    assert await waiting.result(TIMEOUT) == "next"
    assert await stuck.result(TIMEOUT) == 2  # recovered: its lost attempt counted


async def test_group_job_waits_for_its_group_and_runs_only_there(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    start_worker("contract", engine)
    job = await client.enqueue("whoami", _worker_group="gpu")
    plain = await client.enqueue("add", 1, 2)
    assert await plain.result(TIMEOUT) == 3  # jobs with no target run on the default group
    assert await job.status() == "queued"
    waiting = await client.redis.zcard(client.keys.ready("contract", "gpu"))
    assert waiting == 1
    gpu = start_worker("contract", engine, "--group", "gpu", "--id", "gpu-1")
    info = await job.result(TIMEOUT)
    assert info["engine"] == engine
    started = [e for e in await events_of(client, "contract", "job.started") if e["job_id"] == job.job_id]
    assert [e["worker_id"] for e in started] == ["gpu-1"]
    gpu.stop()


async def test_selector_job_runs_on_a_worker_with_every_label(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    start_worker("contract", engine, "--label", "gpu=false", "--id", "cpu-1")
    start_worker("contract", engine, "--label", "gpu=true", "--label", "zone=eu", "--id", "gpu-eu")
    jobs = [await client.enqueue("whoami", _worker_selector={"gpu": "true"}) for _ in range(3)]
    for job in jobs:
        await job.result(TIMEOUT)
    started = {e["worker_id"] for e in await events_of(client, "contract", "job.started")}
    assert started == {"gpu-eu"}


async def test_fallback_fail_and_cancel_end_at_once(engine: str, client: WorkerClient, start_worker: Any) -> None:
    start_worker("contract", engine)
    failed = await client.enqueue("add", 1, 1, _worker_group="nope", _fallback="fail")
    with pytest.raises(JobFailed) as error:
        await failed.result(TIMEOUT)
    assert error.value.error_type == "NoWorker" and "group 'nope'" in error.value.message
    assert await client.redis.zscore(client.keys.dead("contract"), failed.job_id)  # a dead letter: `app dead retry`
    cancelled = await client.enqueue("add", 1, 1, _worker_selector={"gpu": "h100"}, _fallback="cancel")
    assert await cancelled.status() == "cancelled"
    waits = await client.enqueue("add", 1, 1, _worker_group="nope")  # wait: the default
    assert await waits.status() == "queued"
    types = [e["type"] for e in await events_of(client, "contract") if e["job_id"] == failed.job_id]
    assert types == ["job.enqueued", "job.failed"]


async def test_pause_stops_starts_and_resume_restarts_them_in_order(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    worker = start_worker("contract", engine)
    before = [await client.enqueue("add", i, 0) for i in range(3)]  # in the engine before the pause
    for job in before:
        await job.result(TIMEOUT)
    worker.stop()
    backlog = [await client.enqueue("add", i, 10) for i in range(3)]  # in the engine, no worker
    assert await pause(client.redis, client.keys, "contract")
    during = [await client.enqueue("add", i, 20) for i in range(3)]  # accepted while paused
    start_worker("contract", engine)
    await until(lambda: client.redis.zcard(client.keys.ready("contract")), what="the backlog parked")
    await asyncio.sleep(1.0)  # a paused queue starts nothing: give it time to (wrongly) start one
    for job in [*backlog, *during]:
        assert await job.status() == "queued"
    assert await resume(client.redis, client.keys, "contract")
    assert [await job.result(TIMEOUT) for job in [*backlog, *during]] == [10, 11, 12, 20, 21, 22]


async def test_rate_limit_holds_across_two_processes(engine: str, client: WorkerClient, start_worker: Any) -> None:
    start_worker("routed", engine, "--processes", "2")
    jobs = [await client.enqueue("limited", _queue="routed") for _ in range(8)]
    for job in jobs:
        await job.result(TIMEOUT)
    starts = sorted(int(e["ts"]) for e in await events_of(client, "routed", "job.started"))
    assert len(starts) == 8
    for i in range(len(starts) - 3):
        assert starts[i + 3] - starts[i] >= 1000, f"4 starts within 1 s: {starts}"


async def test_dequeue_takes_the_next_waiting_job_and_leaves_a_running_one(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    from app.components.worker.dequeue import cancel_next

    start_worker("routed", engine, "--threads", "1")
    running = await client.enqueue("hold", 30, _queue="routed")
    async def is_running() -> bool:
        return await running.status() == "running"

    await until(is_running, what="the first job running")
    low = await client.enqueue("step", "low", _queue="routed")
    high = await client.enqueue("step", "high", _queue="routed", _priority="high")
    assert await cancel_next(client, "routed") == high.job_id
    assert await cancel_next(client, "routed") == low.job_id
    assert await cancel_next(client, "routed") is None
    assert await running.status() == "running"
    assert await high.status() == "cancelled"
    assert await client.redis.zcard(client.keys.ready("routed")) == 0


async def test_a_routed_retry_keeps_its_route_and_poison_in_a_ready_set_is_dropped(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    await client.redis.zadd(client.keys.ready("contract", "gpu"), {b"\xff\xfe not json": 0, '{"id": 5}': 1})
    start_worker("contract", engine, "--group", "gpu", WORKER_RETRY_BACKOFF_SECONDS="0.05")
    job = await client.enqueue("flaky", 2, _priority="high", _worker_group="gpu")
    assert await job.result(TIMEOUT) == 2
    types = [e["type"] for e in await events_of(client, "contract") if e["job_id"] == job.job_id]
    assert types == ["job.enqueued", "job.started", "job.retried", "job.started", "job.completed"]
    malformed = [e for e in await events_of(client, "contract", "job.failed") if not e["job_id"]]
    assert len(malformed) == 2 and all(e["error"].startswith("MalformedMessage") for e in malformed)
    assert await client.redis.zcard(client.keys.ready("contract", "gpu")) == 0


async def test_a_task_at_its_rate_limit_does_not_hold_back_the_others(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    limited = [await client.enqueue("limited", _queue="routed") for _ in range(9)]
    other = await client.enqueue("step", "other", _queue="routed")  # behind nine jobs of a 3/s task
    start_worker("routed", engine)
    assert await other.result(TIMEOUT) == "other"
    starts = {e["job_id"]: int(e["ts"]) for e in await events_of(client, "routed", "job.started")}
    assert len([j for j in limited if j.job_id in starts and starts[j.job_id] <= starts[other.job_id]]) <= 3
    for job in limited:
        await job.result(TIMEOUT)


async def test_an_admitted_entry_the_worker_cannot_decode_ends_failed_and_frees_its_slot(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    """Written behind the layer's back: cjson reads it, Python does not (try 1.0), or neither."""
    odd = '{"id":"odd-try","task":"add","queue":"routed","args":[1,2],"kwargs":{},"try":1.0,"run":"r1"}'
    bad = '{"id":"odd-args","task":"add","queue":"routed","args":{"a":1},"kwargs":{},"try":1,"run":"r2"}'
    for job_id, raw, run in (("odd-try", odd, "r1"), ("odd-args", bad, "r2")):
        await client.redis.hset(client.keys.job(job_id), mapping={
            "status": "queued", "attempt": 0, "queue": "routed", "task": "add", "envelope": raw, "run": run})
        await client.redis.zadd(client.keys.ready("routed"), {raw: 1})
    start_worker("routed", engine, WORKER_MAX_CONCURRENCY_ROUTED="1")
    for job_id in ("odd-try", "odd-args"):
        with pytest.raises(JobFailed) as failed:
            await client.job(job_id).result(TIMEOUT)
        assert failed.value.error_type == "MalformedMessage"
    assert await (await client.enqueue("step", "after", _queue="routed")).result(TIMEOUT) == "after"
    assert await client.redis.hlen(client.keys.leases("routed")) == 0


async def test_sigterm_then_sigkill_mid_burst_loses_no_routed_job_and_leaks_no_slot(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    settings = {"WORKER_MAX_CONCURRENCY_ROUTED": "3", "WORKER_OFFLINE_AFTER": "2", "WORKER_WARNING_AFTER": "0.5",
                "WORKER_UNHEALTHY_AFTER": "1", "WORKER_SHUTDOWN_TIMEOUT": "0.1"}
    jobs = [await client.enqueue("hold", 0.3, _queue="routed", _priority="high" if i % 3 else "low")
            for i in range(24)]

    async def started() -> int:
        return len(await events_of(client, "routed", "job.started"))

    first = start_worker("routed", engine, "--processes", "2", "--threads", "4", **settings)
    await until(lambda: started_at_least(started, 4), what="a few starts")
    first.stop(signal.SIGTERM)  # graceful: running jobs handed back (grace 0.1 s)
    second = start_worker("routed", engine, **settings)
    before = await started()
    await until(lambda: started_at_least(started, before + 3), what="more starts")
    second.stop(signal.SIGKILL)  # its jobs come back once it is offline
    start_worker("routed", engine, **settings)
    for job in jobs:
        await job.result(TIMEOUT)
    events = await events_of(client, "routed")
    for job in jobs:
        ends = [e["type"] for e in events if e["job_id"] == job.job_id and e["type"] in ("job.completed", "job.failed")]
        assert ends == ["job.completed"], (job.job_id, ends)
    await until(lambda: _no_leases(client), what="every lease released")


async def started_at_least(count: Any, n: int) -> bool:
    return await count() >= n


async def _no_leases(client: WorkerClient) -> bool:
    return await client.redis.hlen(client.keys.leases("routed")) == 0
