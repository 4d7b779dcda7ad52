"""What an idle worker sends: the delayed mover's pass over an empty or not-yet-due set is one
read, the heartbeat tells the reaper who is offline (no call of the reaper's own), and the
engine sweep of an idle queue is its counts only."""

from __future__ import annotations

import time
from typing import Any

import redis as sync_redis

from app.components.worker.api import WorkerClient
from app.components.worker.config import resolve
from app.components.worker.engine_switch import take_over
from app.components.worker.health import Heartbeat
from app.components.worker.runtime.reaper import Reaper
from app.components.worker.runtime.store import JobStore


def _calls(conn: sync_redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in conn.info("commandstats").items()}


def _delta(conn: sync_redis.Redis, before: dict[str, int]) -> dict[str, int]:
    after = _calls(conn)
    return {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) and k not in ("info",)}


async def test_idle_mover_pass_is_one_read(make_settings: Any, redis_url: str) -> None:
    client = WorkerClient(make_settings(worker_backend="taskiq"))
    store = JobStore(client.redis, client.keys)
    conn = sync_redis.Redis.from_url(redis_url)
    try:
        await store.take_due("contract", 10, 1000)  # loads the script
        before = _calls(conn)
        assert await store.take_due("contract", 10, 1000) == ([], None)
        assert _delta(conn, before) == {"evalsha": 1, "time": 1, "zrange": 1}
        await client.enqueue("add", 1, 2, _delay=60)
        before = _calls(conn)
        items, wait = await store.take_due("contract", 10, 1000)
        assert items == [] and wait is not None and 58_000 < wait <= 60_000
        assert _delta(conn, before) == {"evalsha": 1, "time": 1, "zrange": 1}
        await client.enqueue("add", 3, 4, _delay=0.001)
        time.sleep(0.01)
        items, wait = await store.take_due("contract", 10, 1000)
        assert len(items) == 1 and wait is not None and wait > 58_000  # the due one taken, the next one's wait
    finally:
        conn.close()
        await client.close()


async def test_the_beat_tells_the_reaper_who_is_offline(make_settings: Any, redis_url: str) -> None:
    settings = make_settings(worker_backend="taskiq", worker_offline_after=30)
    client = WorkerClient(settings)
    conn = sync_redis.Redis.from_url(redis_url)
    keys = client.keys
    try:
        beat = Heartbeat(conn, keys, settings, queue="contract", engine="taskiq", worker_id="me", instance="me~1",
                         labels={}, concurrency=1, counters=dict)
        now_ms = int(conn.time()[0]) * 1000
        conn.zadd(keys.instances, {"contract|dead~1": now_ms - 60_000, "contract|alive~1": now_ms - 1_000})
        beat.beat()
        assert beat.offline_seen is not None and beat.offline_seen[1] == ["contract|dead~1"]

        class Stub:
            class queue:  # noqa: N801 - the attribute the reaper reads
                name = "contract"

            class worker:  # noqa: N801
                instance = "me~1"

        reaper = Reaper(client.redis, keys, Stub(), None, settings.worker_offline_after, beat)  # type: ignore[arg-type]
        assert reaper._seen_by_beat() == ["contract|dead~1"]
        beat.offline_seen = (time.monotonic() - 10, [])  # a stale beat: the reaper asks Redis itself
        assert reaper._seen_by_beat() is None
        beat.beat(state="stopped")  # the last beat lists nothing and keeps what it had
        assert beat.offline_seen[1] == []
    finally:
        conn.close()
        await client.close()


async def test_idle_engine_sweep_is_its_counts(make_settings: Any, redis_url: str) -> None:
    settings = make_settings(worker_backend="taskiq")
    client = WorkerClient(settings)
    conn = sync_redis.Redis.from_url(redis_url)
    try:
        config = resolve(client.registry.queue("contract"), settings)
        await client.redis.ping()  # the connection is up: its hello is not the sweep's
        before = _calls(conn)
        assert await take_over(client.redis, client.keys, settings, config) == 0
        assert sorted(_delta(conn, before)) == ["hlen", "zcard"]  # arq's and Dramatiq's counts
    finally:
        conn.close()
        await client.close()
