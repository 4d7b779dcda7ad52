"""The engine contract: the same behaviour on arq, Dramatiq and TaskIQ, against a real Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from app.components.worker.api import Accepting, WorkerClient
from app.components.worker.config import resolve
from app.components.worker.engines import engine_class
from app.components.worker.envelope import Envelope, new_run, now_ms
from app.components.worker.events import read_events
from app.core.errors import DuplicateJob, EngineMismatch, JobFailed, PayloadError, UnknownQueue, UnknownTask

pytestmark = pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])

RESULT_TIMEOUT = 30


async def trail(client: WorkerClient, job_id: str) -> list[dict[str, str]]:
    return [e async for e in read_events(client.redis, client.keys, job_id=job_id)]


async def wait_trail(client: WorkerClient, job_id: str, last: str, timeout: float = 10) -> list[dict[str, str]]:
    """Events of a job once its terminal event is in the stream (the publisher batches)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        events = await trail(client, job_id)
        if events and events[-1]["type"] == last:
            return events
        assert loop.time() < deadline, f"trail of {job_id} never reached {last}: {[e['type'] for e in events]}"
        await asyncio.sleep(0.02)


async def test_async_and_sync_tasks_round_trip_json(engine: str, client: WorkerClient, start_worker: Any) -> None:
    start_worker("contract", engine)
    job_async = await client.enqueue("add", 2, 3)
    job_sync = await client.enqueue("multiply", a=6, b=7)
    payload = {"text": "héllo ✓", "n": [1, 2.5, None, True], "nested": {"a": {"b": []}}}
    job_echo = await client.enqueue("echo", "x", 1, **payload)
    assert await job_async.result(RESULT_TIMEOUT) == 5
    assert await job_sync.result(RESULT_TIMEOUT) == 42
    assert await job_echo.result(RESULT_TIMEOUT) == {"args": ["x", 1], "kwargs": payload}
    assert await job_async.status() == "completed"


async def test_unserialisable_arguments_are_refused_at_enqueue(engine: str, client: WorkerClient) -> None:
    with pytest.raises(PayloadError, match="JSON"):
        await client.enqueue("echo", object())
    with pytest.raises(PayloadError, match="WORKER_MAX_PAYLOAD_BYTES"):
        await client.enqueue("echo", "x" * 2_000_000)


async def test_result_by_id_alone_with_ttl_and_error(
    engine: str, client: WorkerClient, make_settings: Any, start_worker: Any
) -> None:
    start_worker("contract", engine, worker_keep_result_seconds="50")
    ok = await client.enqueue("add", 1, 1)
    bad = await client.enqueue("always_fails", "the reason")
    await ok.result(RESULT_TIMEOUT)
    with pytest.raises(JobFailed):
        await bad.result(RESULT_TIMEOUT)
    other = WorkerClient(make_settings())
    try:
        assert await other.job(ok.job_id).result(1) == 2
        with pytest.raises(JobFailed) as failed:
            await other.job(bad.job_id).result(1)
        assert failed.value.error_type == "ValueError"
        assert failed.value.message == "the reason"
        ttl = await other.redis.ttl(other.keys.result(ok.job_id))
        assert 0 < ttl <= 50
        info = await other.job(bad.job_id).info()
        assert info["status"] == "failed" and info["error_type"] == "ValueError" and info["attempts"] == 3
    finally:
        await other.close()


async def test_retries_count_attempts_the_same_everywhere(engine: str, client: WorkerClient, start_worker: Any) -> None:
    start_worker("contract", engine)
    flaky = await client.enqueue("flaky", succeed_on=3)  # queue max_tries=3
    always = await client.enqueue("always_fails_4")  # the task's own max_tries=4 wins
    permanent = await client.enqueue("permanent")
    assert await flaky.result(RESULT_TIMEOUT) == 3
    for job in (always, permanent):
        with pytest.raises(JobFailed):
            await job.result(RESULT_TIMEOUT)
    assert (await always.info())["attempts"] == 4
    assert (await permanent.info())["attempts"] == 1
    events = await wait_trail(client, always.job_id, "job.failed")
    assert [e["type"] for e in events] == ["job.enqueued"] + ["job.started", "job.retried"] * 3 + ["job.started", "job.failed"]
    assert [e["attempt"] for e in events if e["type"] == "job.started"] == ["1", "2", "3", "4"]


async def test_environment_max_tries_beats_queue_setting(engine: str, make_settings: Any, start_worker: Any) -> None:
    start_worker("contract", engine, worker_max_tries="2")
    client = WorkerClient(make_settings(worker_backend=engine))
    try:
        job = await client.enqueue("always_fails")
        with pytest.raises(JobFailed):
            await job.result(RESULT_TIMEOUT)
        assert (await job.info())["attempts"] == 2
    finally:
        await client.close()


async def test_timeout_fails_async_and_sync_jobs(engine: str, client: WorkerClient, start_worker: Any) -> None:
    start_worker("contract", engine)
    slow = await client.enqueue("slow_async", 10)
    slow_sync = await client.enqueue("slow_sync", 1.0)
    for job in (slow, slow_sync):
        with pytest.raises(JobFailed) as failed:
            await job.result(RESULT_TIMEOUT)
        assert failed.value.error_type == "JobTimeout"
        assert "0.3s timeout" in failed.value.message
    assert (await slow.info())["attempts"] == 3  # timeouts retry like any error


async def test_delay_is_respected(engine: str, client: WorkerClient, start_worker: Any) -> None:
    start_worker("contract", engine)
    enqueued = now_ms()
    job = await client.enqueue("started_at", _delay=1.0)
    assert await job.status() == "delayed"
    started = await job.result(RESULT_TIMEOUT)
    assert started * 1000 >= enqueued + 1000


async def test_duplicate_job_id_is_not_enqueued_twice(engine: str, client: WorkerClient, start_worker: Any, tmp_path: Any) -> None:
    gate = tmp_path / "gate"
    job = await client.enqueue("wait_for_file", str(gate), _job_id="once")
    with pytest.raises(DuplicateJob):  # pending: no worker yet
        await client.enqueue("wait_for_file", str(gate), _job_id="once")
    start_worker("contract", engine)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESULT_TIMEOUT
    while await job.status() != "running":
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    with pytest.raises(DuplicateJob):  # running
        await client.enqueue("wait_for_file", str(gate), _job_id="once")
    gate.write_text("go")
    assert await job.result(RESULT_TIMEOUT) == "released"
    again = await client.enqueue("add", 1, 2, _job_id="once")  # finished: the id may be reused
    assert await again.result(RESULT_TIMEOUT) == 3
    events = await wait_trail(client, "once", "job.completed")
    assert [e["type"] for e in events].count("job.enqueued") == 2


async def test_unknown_task_or_queue_fails_at_enqueue(engine: str, client: WorkerClient) -> None:
    with pytest.raises(UnknownTask, match="no_such_task"):
        await client.enqueue("no_such_task")
    with pytest.raises(UnknownQueue, match="nowhere"):
        await client.enqueue("add", 1, 2, _queue="nowhere")


async def test_unknown_task_and_malformed_message_at_worker(engine: str, client: WorkerClient, start_worker: Any) -> None:
    start_worker("contract", engine)
    cfg = resolve(client.registry.queue("contract"), client.settings)
    adapter = engine_class(engine)(client.settings, client.keys, cfg)
    ghost = Envelope("ghost-job", "task_from_a_newer_deploy", "contract", [], {}, 1, now_ms())
    try:
        await adapter.send([("garbage.1", "this is not json"), ("ghost-job.1", ghost.encode())])
    finally:
        await adapter.close()
    ghost_job = client.job("ghost-job")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESULT_TIMEOUT
    while await ghost_job.status() == "unknown":  # injected behind the layer's back: no record
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    with pytest.raises(JobFailed) as failed:  # never run (it could repeat a finished job), never silent
        await ghost_job.result(RESULT_TIMEOUT)
    assert failed.value.error_type == "StaleDelivery"
    assert (await client.job("ghost-job").info())["attempts"] == 0
    events = await wait_trail(client, "ghost-job", "job.failed")
    assert [e["type"] for e in events] == ["job.failed"]
    # A job of a newer deploy, accepted by the layer, that this worker's code does not know.
    newer = Envelope("newer-job", "task_from_a_newer_deploy", "contract", [], {}, 1, now_ms(), new_run())
    assert await client._accept([Accepting(newer, newer.encode(), 0, engine, True)]) == [1]
    with pytest.raises(JobFailed) as failed:
        await client.job("newer-job").result(RESULT_TIMEOUT)
    assert failed.value.error_type == "UnknownTaskError"
    assert (await client.job("newer-job").info())["attempts"] == 1
    job = await client.enqueue("add", 20, 22)  # the worker keeps going
    assert await job.result(RESULT_TIMEOUT) == 42
    deadline = loop.time() + RESULT_TIMEOUT
    while True:  # worker-side events without a job state to ride on are flushed in batches
        failures = [e async for e in read_events(client.redis, client.keys, type_="job.failed")]
        if any(e["error"].startswith("MalformedMessage:") and e["job_id"] == "" for e in failures):
            break
        assert loop.time() < deadline, "no job.failed event for the malformed message"
        await asyncio.sleep(0.02)


async def test_job_enqueued_before_any_worker_is_not_lost(engine: str, client: WorkerClient, start_worker: Any) -> None:
    jobs = [await client.enqueue("add", i, i) for i in range(5)]
    start_worker("contract", engine)
    assert [await j.result(RESULT_TIMEOUT) for j in jobs] == [0, 2, 4, 6, 8]


async def test_job_context_is_the_same_on_every_engine(engine: str, client: WorkerClient, start_worker: Any) -> None:
    start_worker("contract", engine)
    job = await client.enqueue("whoami")
    sync_job = await client.enqueue("whoami_sync")
    info = await job.result(RESULT_TIMEOUT)
    assert info["job_id"] == job.job_id and info["attempt"] == 1 and info["queue"] == "contract"
    assert info["engine"] == engine
    assert await sync_job.result(RESULT_TIMEOUT) == {"job_id": sync_job.job_id, "attempt": 1, "engine": engine}


async def test_unserialisable_result_fails_the_job(engine: str, client: WorkerClient, start_worker: Any) -> None:
    start_worker("contract", engine)
    job = await client.enqueue("returns_unserialisable")
    with pytest.raises(JobFailed) as failed:
        await job.result(RESULT_TIMEOUT)
    assert failed.value.error_type == "ResultNotSerializable"
    assert (await job.info())["attempts"] == 1


async def test_producer_refuses_an_engine_no_worker_runs(engine: str, make_settings: Any, start_worker: Any) -> None:
    start_worker("contract", engine)
    other = "taskiq" if engine != "taskiq" else "arq"
    client = WorkerClient(make_settings(worker_backend=other))
    try:
        with pytest.raises(EngineMismatch, match=f"served by {engine}"):
            await client.enqueue("add", 1, 2)
    finally:
        await client.close()


async def test_event_trail_of_a_job(engine: str, client: WorkerClient, start_worker: Any) -> None:
    worker = start_worker("contract", engine)
    job = await client.enqueue("add", 1, 2)
    await job.result(RESULT_TIMEOUT)
    events = await wait_trail(client, job.job_id, "job.completed")
    assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.completed"]
    for e in events:
        assert e["queue"] == "contract" and e["backend"] == engine and e["task"] == "add"
    assert events[1]["attempt"] == events[2]["attempt"] == "1"
    assert events[1]["worker_id"].endswith(f"@{worker.proc.pid}")
    assert int(events[2]["duration_ms"]) >= 0
    assert set(events[0]) >= {"type", "ts", "queue", "backend", "job_id", "task", "attempt", "worker_id",
                              "duration_ms", "error"}


async def test_enqueue_many_in_bulk(engine: str, client: WorkerClient, start_worker: Any) -> None:
    from app.components.worker import JobRequest

    start_worker("contract", engine)
    await client.enqueue("add", 0, 0, _job_id="taken", _delay=60)
    requests = [JobRequest("add", (i, 1)) for i in range(50)]
    requests.append(JobRequest("add", (1, 1), job_id="taken"))
    requests.append(JobRequest("started_at", delay=0.5))
    jobs = await client.enqueue_many(requests)
    assert jobs[50] is None
    assert [await j.result(RESULT_TIMEOUT) for j in jobs[:50]] == [i + 1 for i in range(50)]
    assert await jobs[51].result(RESULT_TIMEOUT) > 0


def _inject_foreign(engine: str, client: WorkerClient, url: str) -> int:
    """Write messages the layer did not write straight into the engine's keys; how many."""
    import redis as sync_redis

    r = sync_redis.Redis.from_url(url)
    ns = client.keys.engine_namespace(engine)
    try:
        if engine == "arq":
            r.set(f"{ns}:job:foreign-1", b"\x80 not json")
            r.set(f"{ns}:job:foreign-2", json.dumps({"t": 1, "f": "other_function", "a": [], "k": {}, "et": 1}))
            r.zadd(f"{ns}:contract", {"foreign-1": 1, "foreign-2": 1})
        elif engine == "dramatiq":
            other = {"queue_name": "contract", "actor_name": "other_actor", "args": [], "kwargs": {},
                     "options": {"redis_message_id": "foreign-2"}, "message_id": "m2", "message_timestamp": 1}
            r.hset(f"{ns}:contract.msgs", mapping={"foreign-1": "not json", "foreign-2": json.dumps(other)})
            r.rpush(f"{ns}:contract", "foreign-1", "foreign-2")
        else:
            r.xadd(f"{ns}:contract", {"data": b"not json"})
            r.xadd(f"{ns}:contract", {"data": json.dumps({"task_id": "x", "task_name": "other", "labels": {},
                                                          "args": [], "kwargs": {}})})
        return 2
    finally:
        r.close()


async def test_foreign_messages_in_engine_keys_fail_with_an_event(
    engine: str, client: WorkerClient, start_worker: Any, redis_url: str
) -> None:
    start_worker("contract", engine)
    count = _inject_foreign(engine, client, redis_url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESULT_TIMEOUT
    while True:
        failures = [e async for e in read_events(client.redis, client.keys, type_="job.failed")
                    if e["error"].startswith("MalformedMessage: ")]
        if len(failures) >= count:
            break
        assert loop.time() < deadline, f"only {len(failures)} foreign messages reported"
        await asyncio.sleep(0.02)
    job = await client.enqueue("add", 2, 2)  # and the worker goes on
    assert await job.result(RESULT_TIMEOUT) == 4


async def test_a_jobs_own_timeout_and_max_tries_win_over_the_tasks(
    engine: str, client: WorkerClient, start_worker: Any
) -> None:
    from app.core.errors import InvalidOption

    start_worker("contract", engine)
    once = await client.enqueue("always_fails", "x", _max_tries=1)
    with pytest.raises(JobFailed):
        await once.result(RESULT_TIMEOUT)
    assert (await once.info())["attempts"] == 1
    quick = await client.enqueue("slow_async", 5, _timeout=0.1, _max_tries=1)
    with pytest.raises(JobFailed) as error:
        await quick.result(RESULT_TIMEOUT)
    assert error.value.error_type == "JobTimeout" and "0.1s" in error.value.message
    with pytest.raises(InvalidOption, match="longest task timeout"):
        await client.enqueue("add", 1, 2, _timeout=10**6)
    with pytest.raises(InvalidOption, match="_max_tries"):
        await client.enqueue("add", 1, 2, _max_tries=0)
