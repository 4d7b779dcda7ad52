"""Engine adapters under faults: graceful stops mid-burst, poison messages in each engine's own
keys, keys outside the prefix, arq's timeout backstop, idle Redis load. Real Redis, real workers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import time
from collections import Counter
from typing import Any

import pytest
import redis as sync_redis

from app.components.worker import JobRequest
from app.components.worker.api import WorkerClient
from app.components.worker.config import resolve
from app.components.worker.engines import engine_class
from app.components.worker.envelope import DISPATCH_NAME
from app.components.worker.events import read_events
from app.core.errors import JobFailed
from tests.conftest import until

ENGINES = ["arq", "dramatiq", "taskiq"]
TERMINAL = ("job.completed", "job.failed")
TIMEOUT = 30


async def _events(client: WorkerClient, type_: str | None = None) -> list[dict[str, str]]:
    return [e async for e in read_events(client.redis, client.keys, type_=type_)]


async def _wait(predicate: Any, what: str, timeout: float = TIMEOUT) -> Any:
    return await until(predicate, timeout, what)


async def _malformed(client: WorkerClient) -> list[dict[str, str]]:
    return [e for e in await _events(client, "job.failed") if e["error"].startswith("MalformedMessage")]


def _engine_keys_clean(engine: str, r: sync_redis.Redis, ns: str) -> list[str]:
    """What is left of messages in the engine's keys (empty: clean)."""
    left = []
    if engine == "arq":
        if r.zcard(f"{ns}:contract"):
            left.append(f"{r.zcard(f'{ns}:contract')} entries in the queue")
        for pattern in ("job", "in-progress", "retry", "result"):
            left += [k.decode() for k in r.scan_iter(f"{ns}:{pattern}:*")]
    elif engine == "dramatiq":
        if r.llen(f"{ns}:contract") or r.hlen(f"{ns}:contract.msgs"):
            left.append(f"list {r.llen(f'{ns}:contract')}, msgs {r.hlen(f'{ns}:contract.msgs')}")
        left += [k.decode() for k in r.scan_iter(f"{ns}:__acks__.*")]
    else:
        if r.xlen(f"{ns}:contract"):
            left.append(f"{r.xlen(f'{ns}:contract')} stream entries")
        if r.exists(f"{ns}:contract") and r.xpending(f"{ns}:contract", "app")["pending"]:
            left.append("pending entries")
    return left


async def _wait_clean(engine: str, r: sync_redis.Redis, ns: str) -> None:
    async def clean() -> bool:
        return not _engine_keys_clean(engine, r, ns)

    try:
        await _wait(clean, "clean engine keys", 10)
    except AssertionError:
        raise AssertionError(f"{engine} keys not clean: {_engine_keys_clean(engine, r, ns)}") from None


@pytest.mark.parametrize("engine", ENGINES)
async def test_graceful_stop_mid_burst_hands_back_everything_fetched(
    engine: str, client: WorkerClient, start_worker: Any, redis_url: str, tmp_path: Any
) -> None:
    """#11.1: 40 jobs of 500 ms bulk-enqueued, 4 slots, SIGTERM about a second in, then a
    fresh worker: every job ends with exactly one terminal event, and the stopped worker
    leaves nothing behind in the engine (no pending entries, no consumer, no acks set)."""
    ns = client.keys.engine_namespace(engine)
    r = sync_redis.Redis.from_url(redis_url)
    try:
        worker = start_worker("contract", engine, "--threads", "4")
        jobs = await client.enqueue_many([JobRequest("chaos_job", (str(tmp_path), f"j{i}", 500)) for i in range(40)])
        ids = {j.job_id for j in jobs}

        async def second_wave_running() -> bool:
            return len(await _events(client, "job.completed")) >= 4

        await _wait(second_wave_running, "the first 4 jobs")
        assert worker.stop() == 0
        if engine == "taskiq":
            assert r.xinfo_consumers(f"{ns}:contract", "app") == []
        if engine == "dramatiq":
            assert list(r.scan_iter(f"{ns}:__acks__.*")) == []
            assert r.zcard(f"{ns}:__heartbeats__") == 0
        fresh = start_worker("contract", engine, "--threads", "20")

        async def all_done() -> bool:
            return ids <= {e["job_id"] for e in await _events(client) if e["type"] in TERMINAL}

        try:
            await _wait(all_done, "a terminal event for all 40 jobs")
        except AssertionError:
            done = {e["job_id"] for e in await _events(client) if e["type"] in TERMINAL}
            missing = sorted(ids - done)
            raise AssertionError(f"no terminal event for {len(missing)} jobs: "
                                 f"{[(m, await client.job(m).status(), await client.redis.hgetall(client.keys.job(m))) for m in missing[:3]]}; "
                                 f"{[(e['type'], e['worker_id'], e['attempt']) for e in await _events(client) if e['job_id'] in missing]}; "
                                 f"delayed: {await client.redis.zrange(client.keys.delayed('contract'), 0, -1)}; "
                                 f"engine keys: {_engine_keys_clean(engine, r, ns)}") from None
        terminal = Counter(e["job_id"] for e in await _events(client) if e["type"] in TERMINAL)
        assert {job_id: n for job_id, n in terminal.items() if n != 1} == {}
        assert {await j.status() for j in jobs} == {"completed"}
        await _wait_clean(engine, r, ns)
        if engine == "taskiq":
            assert len(r.xinfo_consumers(f"{ns}:contract", "app")) == 1  # the fresh worker's only
        assert fresh.stop() == 0
        if engine == "taskiq":
            assert r.xinfo_consumers(f"{ns}:contract", "app") == []
    finally:
        r.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_sigkilled_worker_fetched_messages_come_back_through_the_reaper(
    engine: str, client: WorkerClient, start_worker: Any, redis_url: str, tmp_path: Any
) -> None:
    """#12.9/#11.20: what a SIGKILLed worker had fetched (running or prefetched) comes back
    through the layer's reaper (Dramatiq's maintenance is off), and the dead consumer is gone
    from the engine's keys (TaskIQ's group, Dramatiq's acks and heartbeats)."""
    ns = client.keys.engine_namespace(engine)
    r = sync_redis.Redis.from_url(redis_url)
    timing = {"worker_offline_after": "2", "worker_heartbeat_interval": "0.2"}
    try:
        victim = start_worker("contract", engine, "--threads", "2", **timing)
        jobs = await client.enqueue_many([JobRequest("chaos_job", (str(tmp_path), f"k{i}", 300)) for i in range(8)])
        ids = {j.job_id for j in jobs}

        async def running() -> bool:
            return len(await _events(client, "job.started")) >= 2

        await _wait(running, "two jobs running")
        victim.stop(signal.SIGKILL)
        start_worker("contract", engine, "--threads", "8", **timing)

        async def all_done() -> bool:
            return ids <= {e["job_id"] for e in await _events(client) if e["type"] in TERMINAL}

        await _wait(all_done, "a terminal event for all 8 jobs")
        await _wait_clean(engine, r, ns)  # arq: once the killed attempts' in-progress leases lapse
        terminal = Counter(e["job_id"] for e in await _events(client) if e["type"] in TERMINAL)
        assert {job_id: n for job_id, n in terminal.items() if n != 1} == {}
        assert {await j.status() for j in jobs} == {"completed"}
        if engine == "taskiq":
            assert len(r.xinfo_consumers(f"{ns}:contract", "app")) == 1  # the live worker's only
        if engine == "dramatiq":
            assert r.zcard(f"{ns}:__heartbeats__") <= 1  # the live worker's only
    finally:
        r.close()


def _envelope(job_id: str, **changes: Any) -> str:
    fields = {"id": job_id, "task": "add", "queue": "contract", "args": [1, 2], "kwargs": {}, "try": 1,
              "enqueued_at": 1}
    fields.update(changes)
    return json.dumps(fields)


# Arguments of the dispatcher that are not one envelope string (#11.16), the same on every engine.
BAD_ARGUMENTS: list[list[Any]] = [
    [42],
    [{"id": "p-dict", "task": "add"}],
    [],
    [_envelope("p-extra"), "extra"],
]
INFINITE_TIME = _envelope("p-inf").replace('"enqueued_at": 1', '"enqueued_at": 1e400')


def _inject_poison(engine: str, r: sync_redis.Redis, ns: str) -> int:
    """Write messages the layer cannot run straight into the engine's keys; how many."""
    argument_lists = [*BAD_ARGUMENTS, [INFINITE_TIME]]
    if engine == "arq":
        for i, args in enumerate(argument_lists):
            r.set(f"{ns}:job:p{i}", json.dumps({"t": 1, "f": DISPATCH_NAME, "a": args, "k": {}, "et": 1}))
        r.set(f"{ns}:job:p-fields", json.dumps({"f": DISPATCH_NAME}))
        r.set(f"{ns}:job:p-et", b'{"t":1,"f":"app.run","a":["x"],"k":{},"et":1e400}')
        members = {f"p{i}": 1 for i in range(len(argument_lists))}
        members.update({"p-fields": 1, "p-et": 1, "p-no-job-key": 1, b"p-\xff": 1})
        r.zadd(f"{ns}:contract", members)
        return len(members)
    if engine == "dramatiq":
        stored: dict[str, Any] = {}
        for i, args in enumerate(argument_lists):
            stored[f"p{i}"] = json.dumps({"queue_name": "contract", "actor_name": DISPATCH_NAME, "args": args,
                                          "kwargs": {}, "options": {}, "message_id": f"m{i}", "message_timestamp": 1})
        stored["p-fields"] = json.dumps({"actor_name": DISPATCH_NAME})  # a message missing fields
        stored["p-bytes"] = b"\x80 not a message"  # undecodable: acked once, not re-reported on restart
        r.hset(f"{ns}:contract.msgs", mapping=stored)
        r.rpush(f"{ns}:contract", *stored, "p-no-hash-entry")
        return len(stored) + 1
    stream = f"{ns}:contract"
    for args in argument_lists:
        r.xadd(stream, {"data": json.dumps({"task_id": "x", "task_name": DISPATCH_NAME, "labels": {},
                                            "args": args, "kwargs": {}})})
    r.xadd(stream, {"data": json.dumps({"task_name": DISPATCH_NAME})})  # badly shaped: no id, labels, args
    r.xadd(stream, {"other": "no data field"})
    r.xadd(stream, {"data": b"\x80 not json"})
    return len(argument_lists) + 3


@pytest.mark.parametrize("engine", ENGINES)
async def test_poison_in_engine_keys_ends_with_one_event_and_is_removed(
    engine: str, client: WorkerClient, start_worker: Any, redis_url: str
) -> None:
    """#11.16/#11.17: each poison message ends with exactly one job.failed (MalformedMessage),
    the engine's keys are clean afterwards, and a restarted worker reports nothing again."""
    ns = client.keys.engine_namespace(engine)
    r = sync_redis.Redis.from_url(redis_url)
    try:
        count = _inject_poison(engine, r, ns)
        worker = start_worker("contract", engine)

        async def reported() -> list[dict[str, str]]:
            found = await _malformed(client)
            return found if len(found) >= count else []

        found = await _wait(reported, f"{count} MalformedMessage events")
        await _wait_clean(engine, r, ns)
        job = await client.enqueue("add", 2, 2)  # and the worker goes on
        assert await job.result(TIMEOUT) == 4
        assert worker.stop() == 0
        start_worker("contract", engine)
        job = await client.enqueue("add", 3, 3)
        assert await job.result(TIMEOUT) == 6
        await _wait_clean(engine, r, ns)
        assert len(await _malformed(client)) == len(found) == count, [e["error"] for e in found]
    finally:
        r.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_every_key_lives_under_the_prefix(
    engine: str, client: WorkerClient, start_worker: Any, redis_url: str, prefix: str
) -> None:
    """#11.12: jobs, retries, delays, failures and a stop write keys under WORKER_KEY_PREFIX only."""
    r = sync_redis.Redis.from_url(redis_url)
    try:
        before = set(r.scan_iter(count=1000))
        worker = start_worker("contract", engine)
        jobs = [await client.enqueue("add", 1, 1), await client.enqueue("flaky", succeed_on=2),
                await client.enqueue("always_fails"), await client.enqueue("add", 2, 2, _delay=0.2)]
        for job in jobs:
            with contextlib.suppress(JobFailed):
                await job.result(TIMEOUT)
        during = set(r.scan_iter(count=1000))
        assert worker.stop() == 0
        after = set(r.scan_iter(count=1000))
        outside = {k for k in (during | after) - before if not k.startswith(f"{prefix}:".encode())}
        assert outside == set()
    finally:
        r.close()


@pytest.mark.parametrize("engine", ENGINES)
async def test_worker_under_an_acl_limited_to_the_prefix(
    engine: str, make_settings: Any, start_worker: Any, redis_url: str, prefix: str
) -> None:
    """#11.12/#11.19: a Redis user that may touch only ``<prefix>:*`` keys and may not run INFO
    is enough for producer and worker on every engine."""
    r = sync_redis.Redis.from_url(redis_url)
    user, password = f"u{prefix}", "pw-" + prefix
    r.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=[f"{prefix}:*"], commands=["+@all", "-info"])
    client = WorkerClient(make_settings(worker_backend=engine, redis_username=user, redis_password=password))
    try:
        worker = start_worker("contract", engine, wait=False, redis_username=user, redis_password=password)

        async def beating() -> bool:
            assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
            return bool(r.keys(f"{prefix}:heartbeat:contract:*"))

        await _wait(beating, "the worker's heartbeat")
        jobs = [await client.enqueue("add", 1, 2), await client.enqueue("flaky", succeed_on=2),
                await client.enqueue("add", 2, 2, _delay=0.1)]
        assert [await j.result(TIMEOUT) for j in jobs] == [3, 2, 4]
        assert worker.stop() == 0  # a clean stop too, before the user goes away
    finally:
        await client.close()
        r.acl_deluser(user)
        r.close()


def test_arq_backstop_is_past_the_longest_task_timeout(make_settings: Any) -> None:
    """#11.2: arq's own job timeout never cuts a task that has a longer timeout of its own."""
    client = WorkerClient(make_settings(worker_backend="arq"))
    spec = client.registry.queue("contract")
    slow = dataclasses.replace(spec.tasks["slow_async"], timeout=900.0)
    spec = dataclasses.replace(spec, tasks={**spec.tasks, "slow_async": slow})
    cfg = resolve(spec, client.settings)
    assert cfg.timeout == 30 and cfg.longest_timeout == 900
    adapter = engine_class("arq")(client.settings, client.keys, cfg)
    assert adapter.job_timeout >= 900 + client.settings.worker_shutdown_timeout


def _calls(r: sync_redis.Redis) -> int:
    return sum(int(v["calls"]) for k, v in r.info("commandstats").items())


@pytest.mark.parametrize("engine", ENGINES)
async def test_idle_worker_load_is_small(engine: str, client: WorkerClient, start_worker: Any, redis_url: str) -> None:
    """#12.10: an idle worker waits on Redis instead of polling it (was ~190-350 calls/s),
    and still picks up a new job at once."""
    r = sync_redis.Redis.from_url(redis_url)
    try:
        start_worker("contract", engine)
        await (await client.enqueue("add", 0, 0)).result(TIMEOUT)
        first, started = _calls(r), time.monotonic()
        await asyncio.sleep(2)  # measuring a rate over an interval
        rate = (_calls(r) - first) / (time.monotonic() - started)
        assert rate < 100, f"{engine}: idle worker made {rate:.0f} Redis calls/s"
        job = await client.enqueue("add", 1, 2)
        assert await job.result(TIMEOUT) == 3
    finally:
        r.close()
