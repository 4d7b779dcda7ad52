"""What enqueue promises and what a worker does with deliveries that must not run.

- Accepting a job and making it deliverable is one atomic step: a refused enqueue (a live
  duplicate id, Redis out of memory) leaves nothing behind, a retried call is not doubled.
- A delivery runs only when it belongs to the current run of its job id; a delivery with no
  record, or one no worker can decode, ends with exactly one job.failed event.
- One rule for delays, timeouts, job ids and argument depth, with one clear error.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import redis as sync_redis

from app.components.worker import clock
from app.components.worker.api import Accepting, JobRequest, SyncWorkerClient, WorkerClient
from app.components.worker.config import resolve
from app.components.worker.dequeue import cancel_waiting
from app.components.worker.engines import engine_class
from app.components.worker.envelope import Envelope, new_run, now_ms
from app.components.worker.events import EventPublisher, EventPublishMiddleware, read_events
from app.components.worker.middleware import MiddlewareChain
from app.components.worker.runtime.context import WorkerContext
from app.components.worker.runtime.store import JobStore
from app.components.worker.runtime.wrapper import JobRuntime
from app.components.worker.validation import MAX_DEPTH
from app.core.errors import DuplicateJob, InvalidOption, JobFailed, PayloadError, RedisUnavailable
from app.core.redis_server import RedisServer
from tests.conftest import until

ENGINES = ["arq", "dramatiq", "taskiq"]
RESULT_TIMEOUT = 30


def nested(depth: int) -> Any:
    """A value ``depth`` lists deep (``nested(1) == ["leaf"]``)."""
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


async def trail(client: WorkerClient, job_id: str) -> list[dict[str, str]]:
    return [e async for e in read_events(client.redis, client.keys, job_id=job_id)]


async def wait_for(check: Any, what: str, timeout: float = RESULT_TIMEOUT) -> Any:
    return await until(check, timeout, what)


def adapter_of(client: WorkerClient, engine: str) -> Any:
    cfg = resolve(client.registry.queue("contract"), client.settings)
    return engine_class(engine)(client.settings, client.keys, cfg)


async def waiting_messages(client: WorkerClient, engine: str) -> int:
    adapter = adapter_of(client, engine)
    try:
        stats = await adapter.stats()
    finally:
        await adapter.close()
    return stats.ready + stats.running


# -- Refused and retried enqueues leave nothing extra ----------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_same_id_twice_is_refused_even_within_one_ms(engine: str, client: WorkerClient) -> None:
    refused = 0
    for n in range(100):  # back to back: most pairs fall in the same millisecond
        await client.enqueue("add", 1, 2, _job_id=f"twice-{n}")
        try:
            await client.enqueue("add", 1, 2, _job_id=f"twice-{n}")
        except DuplicateJob:
            refused += 1
    assert refused == 100
    jobs = await client.enqueue_many([JobRequest("add", (1, 1), job_id="batch-dup"),
                                      JobRequest("add", (2, 2), job_id="batch-dup"),
                                      JobRequest("add", (3, 3))])
    assert jobs[0] is not None and jobs[1] is None and jobs[2] is not None
    # One message per accepted job: the refused ones sent nothing to the engine.
    assert await waiting_messages(client, engine) == 102
    enqueued = [e async for e in read_events(client.redis, client.keys, type_="job.enqueued")]
    assert len(enqueued) == 102


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_retried_enqueue_call_is_recognised(engine: str, client: WorkerClient) -> None:
    """The same script call sent twice (its reply lost) keeps its runs: accepted once, one
    message each, whether the engine's commands go per job (chosen ids) or as one batch."""
    chosen, raw, _ = client._envelope("add", (1, 2), {}, None, "retried")
    fresh = [client._envelope("add", (n, 2), {}, None, None)[:2] for n in range(3)]
    call = [Accepting(chosen, raw, 0, engine, True), *(Accepting(env, raw_, 0, engine, False) for env, raw_ in fresh)]
    assert await client._accept(call) == [1, 1, 1, 1]
    assert await client._accept(call) == [1, 1, 1, 1]  # recognised as its own retry, not a duplicate
    assert await waiting_messages(client, engine) == 4
    assert [e["type"] for e in await trail(client, "retried")] == ["job.enqueued"]
    assert await client.redis.hget(client.keys.job("retried"), "run") == chosen.run.encode()


@pytest.mark.parametrize("engine", ENGINES)
async def test_out_of_memory_enqueue_leaves_nothing(engine: str, make_settings: Any) -> None:
    server = RedisServer(extra=["--maxmemory", "16mb", "--maxmemory-policy", "noeviction"]).start()
    r = sync_redis.Redis.from_url(server.url)
    client = WorkerClient(make_settings(redis_url=server.url, worker_backend=engine))
    try:
        await client.enqueue("add", 0, 0)  # scripts loaded, stream created
        filled = 0
        while True:
            try:
                r.set(f"fill:{filled}", b"x" * 200_000)
            except sync_redis.ResponseError:
                break
            filled += 1
        before = r.dbsize()
        with pytest.raises(RedisUnavailable) as single:
            await client.enqueue("echo", "y" * 900_000)
        requests = [JobRequest("add", (n, 1), job_id=f"bulk-{n}") for n in range(3000)]
        with pytest.raises(RedisUnavailable) as bulk:
            await client.enqueue_many(requests)
        for error in (single.value, bulk.value):
            message = str(error)
            assert "out of memory" in message and "nothing was enqueued" in message
            assert "\n" not in message and len(message) < 300 and "yyyy" not in message
        assert r.dbsize() == before  # no record, no message, no event
        r.delete(*[f"fill:{n}" for n in range(filled)])
        jobs = await client.enqueue_many(requests)  # nothing was left to refuse them as duplicates
        assert all(job is not None for job in jobs)
        assert await waiting_messages(client, engine) == 3001
    finally:
        await client.close()
        r.close()
        server.cleanup()


# -- Deliveries that must not run -------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_stale_ghost_and_undecodable_deliveries(engine: str, client: WorkerClient, start_worker: Any) -> None:
    # A stale message: the id's first run was cancelled while its message waited in the
    # engine, then the id was reused with other arguments.
    await client.enqueue("echo", "old", _job_id="reused")
    assert await cancel_waiting(client, "contract", "reused") == ["reused"]
    await client.enqueue("echo", "new", _job_id="reused")
    # A delivery with no record, delivered twice.
    ghost = Envelope("ghost", "add", "contract", [1, 2], {}, 1, now_ms(), new_run())
    # Messages no worker can decode, of jobs that wait (delayed, so theirs is the only message).
    broken = {}
    for job_id, mangle in {
        "too-deep": lambda raw: raw.replace('"args":[]', '"args":' + "[" * 5000 + "]" * 5000),
        "bad-time": lambda raw: raw.replace('"enqueued_at":', '"enqueued_at":1e400,"x":'),
        "bad-try": lambda raw: raw.replace('"try":1', '"try":"one"'),
    }.items():
        env, raw, _ = client._envelope("add", (), {}, None, job_id)
        assert await client._accept([Accepting(env, raw, 3_600_000, engine, True)]) == [1]
        broken[job_id] = mangle(raw)
    adapter = adapter_of(client, engine)
    try:
        await adapter.send([(ghost.message_id, ghost.encode()), (ghost.message_id, ghost.encode()),
                            *((f"{job_id}.1.x", raw) for job_id, raw in broken.items())])
    finally:
        await adapter.close()
    deep = await client.enqueue("echo", nested(MAX_DEPTH))  # the deepest accepted still runs
    start_worker("contract", engine)

    assert await deep.result(RESULT_TIMEOUT) == {"args": [nested(MAX_DEPTH)], "kwargs": {}}
    assert await client.job("reused").result(RESULT_TIMEOUT) == {"args": ["new"], "kwargs": {}}
    with pytest.raises(JobFailed) as failed:
        await client.job("ghost").result(RESULT_TIMEOUT)
    assert failed.value.error_type == "StaleDelivery" and "no record" in failed.value.message
    for job_id in broken:
        with pytest.raises(JobFailed) as failed:
            await client.job(job_id).result(RESULT_TIMEOUT)
        assert failed.value.error_type == "MalformedMessage", job_id
        assert await client.job(job_id).status() == "failed"

    async def drained() -> bool:
        return await waiting_messages(client, engine) == 0

    await wait_for(drained, "the engine's queue to drain")

    async def reused_trail() -> list[str] | None:
        types = [e["type"] for e in await trail(client, "reused")]
        return types if types[-1:] == ["job.completed"] else None

    # The old run's message was skipped: no second start, no event of its own.
    assert await wait_for(reused_trail, "reused trail") == [
        "job.enqueued", "job.failed", "job.enqueued", "job.started", "job.completed"]
    assert [e["type"] for e in await trail(client, "ghost")] == ["job.failed"]
    for job_id in broken:
        assert [e["type"] for e in await trail(client, job_id)] == ["job.enqueued", "job.failed"]


@pytest.mark.parametrize("engine", ["arq"])
async def test_undecodable_bytes_end_with_one_event(engine: str, client: WorkerClient) -> None:
    """The runtime itself, in this process: bytes that are not UTF-8 fail the job they name
    (found by a regex) with one job.failed event, or leave an event without a job id."""
    spec = client.registry.queue("contract")
    publisher = EventPublisher(client.redis, client.keys, 10_000)
    publisher.start()
    worker = WorkerContext(queue="contract", engine=engine, worker_id="test@1", instance="test@1~x")
    runtime = JobRuntime(spec, resolve(spec, client.settings), JobStore(client.redis, client.keys, 10_000),
                         MiddlewareChain([EventPublishMiddleware(publisher)]), worker, publisher)
    env, raw, _ = client._envelope("add", (), {}, None, "bad-utf8")
    assert await client._accept([Accepting(env, raw, 3_600_000, engine, True)]) == [1]
    try:
        await runtime.execute(raw.encode().replace(b'"args":[]', b'"args":["\xff"]'))
        await runtime.execute(b"\xff\xfe not a message")
        await runtime.execute(raw)  # the job's own message, after the job ended: skipped
    finally:
        await publisher.close()
        runtime.close()
    info = await client.job("bad-utf8").info()
    assert info["status"] == "failed" and info["error_type"] == "MalformedMessage"
    assert [e["type"] for e in await trail(client, "bad-utf8")] == ["job.enqueued", "job.failed"]
    failed = [e async for e in read_events(client.redis, client.keys, type_="job.failed")]
    assert [e["job_id"] for e in failed] == ["bad-utf8", ""]
    assert all(e["error"].startswith("MalformedMessage: ") for e in failed)


# -- One rule for options -----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["arq"])
async def test_options_are_checked_before_anything_is_written(engine: str, client: WorkerClient) -> None:
    for delay in (math.nan, math.inf, -5, 1e300, "soon"):
        with pytest.raises(InvalidOption, match="delay"):
            await client.enqueue("add", 1, 2, _delay=delay)
    for job_id in ("\udcff", "bad-\x00", "", 7):
        with pytest.raises(InvalidOption, match="job id"):
            await client.enqueue("add", 1, 2, _job_id=job_id)
    with pytest.raises(PayloadError, match=f"more than {MAX_DEPTH} levels"):
        await client.enqueue("echo", nested(MAX_DEPTH + 1))
    with pytest.raises(PayloadError, match="nested"):
        await client.enqueue("echo", deep=nested(30_000))
    with pytest.raises(InvalidOption, match="delay"):  # a bad request refuses the whole batch
        await client.enqueue_many([JobRequest("add", (1, 1)), JobRequest("add", (1, 1), delay=-1)])
    with pytest.raises(InvalidOption, match="job id"):
        client.job("bad-\udcff")
    for timeout in (-1, 0, math.nan, math.inf):
        with pytest.raises(InvalidOption, match="timeout"):
            await client.job("anything").result(timeout=timeout)
    assert await client.redis.keys(f"{client.keys.prefix}:*") == []


@pytest.mark.parametrize("engine", ["arq"])
@pytest.mark.parametrize("offset_ms", [3_600_000, -3_600_000])
async def test_delay_is_counted_on_redis_time(
    engine: str, client: WorkerClient, monkeypatch: Any, offset_ms: int
) -> None:
    monkeypatch.setattr(clock, "OFFSET_MS", offset_ms)  # this producer's clock is an hour off
    job = await client.enqueue("add", 1, 2, _delay=2)
    seconds, micros = await client.redis.time()
    redis_now = seconds * 1000 + micros // 1000
    (_, score), = await client.redis.zrange(client.keys.delayed("contract"), 0, -1, withscores=True)
    assert 1000 < score - redis_now <= 2000
    assert await job.status() == "delayed"


@pytest.mark.parametrize("engine", ["arq"])
async def test_every_send_has_its_own_message_id(engine: str, client: WorkerClient) -> None:
    env = Envelope("same", "add", "contract", [1, 2], {}, 1, 0, new_run())
    ids = {env.message_id for _ in range(1000)} | {env.next_try(0).message_id}
    assert len(ids) == 1001 and all(i.startswith("same.1.") for i in ids)
    await client.enqueue("add", 1, 2, _job_id="arq-id")
    adapter = adapter_of(client, engine)
    try:
        (member,) = await client.redis.zrange(adapter.queue_key, 0, -1)
    finally:
        await adapter.close()
    assert member.decode().startswith("arq-id.1.")


def test_sync_client_enqueue_many_and_public_errors(make_settings: Any) -> None:
    from app.components.worker import (  # noqa: F401 - the names the README promises
        DuplicateJob,
        EngineMismatch,
        JobFailed,
        JobNotFound,
        PayloadError,
        RedisUnavailable,
        ResultTimeout,
        UnknownQueue,
        UnknownTask,
    )

    client = SyncWorkerClient(make_settings(worker_backend="arq"))
    try:
        jobs = client.enqueue_many([JobRequest("add", (1, 2), job_id="sync-1"), JobRequest("add", (1, 2), job_id="sync-1")])
        assert jobs[0] is not None and jobs[0].job_id == "sync-1" and jobs[1] is None
        assert jobs[0].status() == "queued"
    finally:
        client.close()
