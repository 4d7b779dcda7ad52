"""Liveness: what decides that a worker is alive, that a job is due, and who writes a job's end.

- clock skew: workers whose clocks are a minute ahead or behind reap no live worker, all
  look healthy, and a delay set by a skewed producer counts from Redis's clock (every engine);
- a stopped instance that still holds a job stays watched, and the reaper never drops a
  claim made while it recovers (job by job, the instance removed only once nothing is held);
- a partition: a worker cut off from Redis by a TCP proxy while another is not; every job
  ends with exactly one terminal event (every engine);
- a poison entry at the lowest score of the delayed set does not trap the jobs behind it;
- health tells "alive but consuming nothing" (engine consumer restarting) and "heartbeats
  refused by Redis (OOM)" from a dead worker, and a clean stop from a crash.

No sleeps where an event can be awaited; every wait has a timeout; no assertion on speed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.components.worker.api import WorkerClient
from app.components.worker.config import resolve
from app.components.worker.engines import base
from app.components.worker.engines.base import ConsumerState, keep_running
from app.components.worker.envelope import Envelope
from app.components.worker.events import EventPublisher, EventPublishMiddleware
from app.components.worker.health import OOM_REASON, Heartbeat, Thresholds, list_workers
from app.components.worker.keys import Keys
from app.components.worker.middleware import MiddlewareChain
from app.components.worker.registry import Registry
from app.components.worker.runtime import scripts
from app.components.worker.runtime.context import JobContext, WorkerContext
from app.components.worker.runtime.store import JobStore
from app.components.worker.runtime.wrapper import JobRuntime
from app.core.redis_server import RedisServer
from tests.conftest import ENGINES, ROOT, until, wait_until
from tests.faults import TcpProxy, free_port

FAST = {"worker_offline_after": "2", "worker_heartbeat_interval": "0.2"}
TIMEOUT = 30
TERMINAL = ("job.completed", "job.failed")
CUT_S = 3.0  # how long the partition lasts at least
DELAYED_TIMEOUT = 15  # generous for a 1 s delay, far below the 60 s a skewed clock would add




async def events(client: WorkerClient) -> list[tuple[str, dict[str, str]]]:
    """(stream id, fields) of every event of this test, oldest first."""
    out = []
    for entry_id, fields in await client.redis.xrange(client.keys.events):
        out.append((entry_id.decode(), {k.decode(): v.decode(errors="replace") for k, v in fields.items()}))
    return out


async def terminal_counts(client: WorkerClient, ids: list[str]) -> Counter[str]:
    wanted = set(ids)
    return Counter(e["job_id"] for _, e in await events(client) if e["type"] in TERMINAL and e["job_id"] in wanted)


async def all_ended(client: WorkerClient, ids: list[str]) -> bool:
    async with client.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.exists(client.keys.result(job_id))
        return sum(await pipe.execute()) == len(ids)


def beat_of(client: sync_redis.Redis, prefix: str, worker_id: str) -> dict[str, Any] | None:
    raw = client.get(Keys(prefix).heartbeat("contract", worker_id))
    return json.loads(raw) if raw else None


async def wait_beating(redis_url: str, prefix: str, ids: list[str], workers: list[Any]) -> None:
    conn = sync_redis.Redis.from_url(redis_url)
    try:
        async def beating() -> bool:
            for worker in workers:
                assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
            return all(beat_of(conn, prefix, wid) for wid in ids)

        await until(beating, what=f"heartbeats of {ids}")
    finally:
        conn.close()


def cli(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env={**env, **extra}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def stream_ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


# 1. clock skew ---------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_skewed_clocks_reap_no_live_worker_and_delays_count_from_redis(
    engine: str, env: dict[str, str], make_settings: Any, start_worker: Any, redis_url: str, prefix: str,
    tmp_path: Path,
) -> None:
    offsets = {"ahead": "60000", "behind": "-60000", "exact": "0"}
    workers = {name: start_worker("contract", engine, "--id", name, "--threads", "4", wait=False,
                                  app_clock_offset_ms=offset, **FAST)
               for name, offset in offsets.items()}
    await wait_beating(redis_url, prefix, list(offsets), list(workers.values()))
    client = WorkerClient(make_settings(worker_backend=engine, worker_offline_after=2))
    keys, thresholds = client.keys, Thresholds(offline=2.0)
    try:
        # Jobs that outlast several reaper passes of every worker (each reaps once it has been
        # connected for a whole offline threshold): a skewed reaper would take them over.
        runs = tmp_path / "runs"
        runs.mkdir()
        jobs = [await client.enqueue("chaos_job", str(runs), f"j{i}", 3000) for i in range(9)]
        ids = [j.job_id for j in jobs]
        # Meanwhile, producers a minute ahead and behind enqueue a job with a 1 s delay.
        cli_env = {**env, "WORKER_BACKEND": engine}
        producers = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "enqueue", "add", "--queue", "contract", "--job-id", f"delayed-{name}",
            "--delay", "1", "--", "a=1", "b=2", env={**cli_env, "APP_CLOCK_OFFSET_MS": offsets[name]}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for name in ("ahead", "behind")]
        states_seen: set[str] = set()

        async def done_while_watching() -> bool:
            rows = await list_workers(client.redis, keys, thresholds, "contract")
            assert {r["worker_id"] for r in rows} == set(offsets)
            states_seen.update(f"{r['worker_id']}:{r['state']}:{r['reason']}" for r in rows)
            return await all_ended(client, ids)

        await until(done_while_watching, 60, what="the long jobs to end")
        assert states_seen == {f"{name}:healthy:" for name in offsets}, states_seen
        infos = [await j.info() for j in jobs]
        assert [i["status"] for i in infos] == ["completed"] * 9, infos
        assert [i["attempts"] for i in infos] == [1] * 9, "a live worker's job was redelivered"
        assert all(len((runs / f"j{i}").read_text().splitlines()) == 1 for i in range(9))
        assert not [e for _, e in await events(client) if e["type"] in ("job.retried", "job.failed")]
        assert (await terminal_counts(client, ids)) == Counter({i: 1 for i in ids})

        # 12.6: a clean stop is listed as stopped, not offline.
        workers["behind"].stop()
        rows = await list_workers(client.redis, keys, thresholds, "contract")
        assert {r["worker_id"]: r["state"] for r in rows} == {"ahead": "healthy", "behind": "stopped",
                                                               "exact": "healthy"}

        # The skewed producers' delays count from Redis's clock: by stream ids (Redis's clock),
        # each job started a second or more after it was enqueued, and not a minute later.
        for producer in producers:
            _, err = await asyncio.wait_for(producer.communicate(), TIMEOUT)
            assert producer.returncode == 0, err.decode()
        for name in ("ahead", "behind"):
            job_id = f"delayed-{name}"
            assert await client.job(job_id).result(DELAYED_TIMEOUT) == 3
            trail = {e["type"]: entry_id for entry_id, e in await events(client) if e["job_id"] == job_id}
            waited = stream_ms(trail["job.started"]) - stream_ms(trail["job.enqueued"])
            assert 1000 <= waited < DELAYED_TIMEOUT * 1000, (name, waited)
    finally:
        await client.close()


# 2. stopping and reaping keep recovery state ---------------------------------------------------


@pytest.mark.parametrize("engine", ["arq"])
async def test_stopped_instance_holding_a_job_is_recovered_and_reaping_drops_no_claim(
    engine: str, make_settings: Any, start_worker: Any, redis_url: str, prefix: str,
) -> None:
    settings = make_settings(worker_backend=engine, worker_offline_after=1.5)
    client = WorkerClient(settings)
    keys = client.keys
    store = JobStore(client.redis, keys)
    conn = sync_redis.Redis.from_url(redis_url)
    try:
        # An instance claims a job, then stops while its hand-back failed: the job is still held.
        job = await client.enqueue("add", 2, 3, _job_id="held-at-stop", _delay=3600)
        raw = (await client.redis.zrange(keys.delayed("contract"), 0, -1))[0].decode()
        await client.redis.zrem(keys.delayed("contract"), raw)
        env = Envelope.decode(raw)
        ghost = Heartbeat(conn, keys, settings, queue="contract", engine=engine, worker_id="ghost",
                          instance="ghost~1", labels={}, concurrency=1, counters=dict)
        ghost.beat()
        assert await store.claim(env, "ghost", "ghost~1", engine, "ghost~1:0") == (True, 1)
        ghost.beat(state="stopped")
        assert await client.redis.smembers(keys.held("ghost~1")) == {b"held-at-stop"}
        assert await client.redis.zscore(keys.instances, "contract|ghost~1") is not None, \
            "a stopped instance that holds a job must stay watched by the reaper"
        rows = await list_workers(client.redis, keys, Thresholds(), "contract")
        assert [(r["worker_id"], r["state"]) for r in rows] == [("ghost", "stopped")]

        # A live worker's reaper recovers it once the last beat is older than the threshold.
        start_worker("contract", engine, worker_offline_after="1.5", worker_heartbeat_interval="0.2")
        assert await job.result(TIMEOUT) == 5
        assert (await job.info())["attempts"] == 2  # the lost attempt counts

        async def forgotten() -> bool:
            return await client.redis.zscore(keys.instances, "contract|ghost~1") is None

        await until(forgotten, what="the recovered instance to leave the watch list")

        # The removal is atomic with "nothing held, still offline": a claim made in between
        # (the held set is not empty any more) keeps the instance, and a fresh beat keeps it.
        forget = client.redis.register_script(scripts.source("forget"))
        await client.redis.zadd(keys.instances, {"contract|late~1": 0})
        await client.redis.sadd(keys.held("late~1"), "claimed-meanwhile")
        assert await forget(keys=[keys.instances, keys.held("late~1"), keys.members("contract")], args=["contract|late~1", 1500, "late~1"]) == 0
        assert await client.redis.smembers(keys.held("late~1")) == {b"claimed-meanwhile"}
        await client.redis.srem(keys.held("late~1"), "claimed-meanwhile")
        seconds, micros = await client.redis.time()
        await client.redis.zadd(keys.instances, {"contract|late~1": seconds * 1000 + micros // 1000})
        assert await forget(keys=[keys.instances, keys.held("late~1"), keys.members("contract")], args=["contract|late~1", 1500, "late~1"]) == -1
        await client.redis.zadd(keys.instances, {"contract|late~1": 0})
        assert await forget(keys=[keys.instances, keys.held("late~1"), keys.members("contract")], args=["contract|late~1", 1500, "late~1"]) == 1
    finally:
        conn.close()
        await client.close()


# 3. a partition: one worker cut off from Redis -------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_worker_cut_off_by_a_partition_leaves_no_second_terminal_event(
    engine: str, make_settings: Any, start_worker: Any, redis_url: str, prefix: str, tmp_path: Path,
) -> None:
    proxy = TcpProxy(redis_url).start()
    client = WorkerClient(make_settings(worker_backend=engine, worker_offline_after=2))
    cut_off = None
    try:
        cut_off = start_worker("contract", engine, "--id", "cut-off", "--threads", "4", wait=False,
                               redis_url=proxy.url, **FAST)
        direct = start_worker("contract", engine, "--id", "direct", "--threads", "4", wait=False, **FAST)
        await wait_beating(redis_url, prefix, ["cut-off", "direct"], [cut_off, direct])
        runs = tmp_path / "runs"
        runs.mkdir()
        jobs = [await client.enqueue("chaos_job", str(runs), f"j{i}", 800) for i in range(30)]
        ids = [j.job_id for j in jobs]

        async def cut_off_slots_full() -> bool:
            # Cut while all its slots run claimed jobs: not while it is picking a message. (arq
            # marks a message in progress before reading it; cut in between, that message waits
            # for arq's own in-progress expiry, not for the layer's recovery: the engines' part.)
            started, ended = Counter(), set()
            for _, e in await events(client):
                if e["type"] == "job.started" and e["worker_id"] == "cut-off":
                    started[e["job_id"]] += 1
                elif e["type"] in TERMINAL:
                    ended.add(e["job_id"])
            return len(set(started) - ended) == 4

        await until(cut_off_slots_full, what="the worker behind the proxy to run four jobs")
        proxy.cut()
        cut_at = asyncio.get_running_loop().time()

        # Cut off until the other worker has judged it offline and recovered what it held (the
        # jobs it ran meanwhile finish there, and their finishes are refused once it is back),
        # and for CUT_S at least: long enough for its retries and its event publisher to back off.
        async def recovered_from_cut_off() -> bool:
            members = [m.decode() for m in await client.redis.zrange(client.keys.instances, 0, -1)]
            lost = any(e["type"] == "job.retried" and "WorkerLost" in e["error"] for _, e in await events(client))
            long_enough = asyncio.get_running_loop().time() - cut_at >= CUT_S
            return long_enough and lost and not any(m.startswith("contract|cut-off~") for m in members)

        await until(recovered_from_cut_off, what="the cut-off worker's jobs to be recovered")
        proxy.restore()
        await until(lambda: all_ended(client, ids), 60, what="every job to end")
        conn = sync_redis.Redis.from_url(redis_url)
        try:
            seconds, micros = await client.redis.time()
            restored_at = seconds + micros / 1e6

            async def settled() -> bool:  # back, beating, and nothing left in its hands
                beat = beat_of(conn, prefix, "cut-off")
                return bool(beat and beat["last_beat"] > restored_at and beat["running"] == 0)

            await until(settled, what="the cut-off worker to beat again with no job running")
        finally:
            conn.close()
        counts = await terminal_counts(client, ids)
        assert counts == Counter({i: 1 for i in ids}), {k: v for k, v in counts.items() if v != 1}
        infos = [await j.info() for j in jobs]
        assert all(i["status"] == "completed" for i in infos), infos
    finally:
        if cut_off is not None:
            cut_off.stop()  # while its Redis is reachable, so it stops cleanly
        await client.close()
        proxy.stop()


class LosesFirstFinish(JobStore):
    """The real store, except that the first finish is lost on the way (a connection reset)
    while, meanwhile, another worker recovered the job: the retry is refused."""

    lost = 0

    async def finish(self, *args: Any, **kwargs: Any) -> bool:
        if not self.lost:
            self.lost += 1
            raise RedisConnectionError("Connection reset by peer")
        return await super().finish(*args, **kwargs)


async def test_a_refused_finish_never_publishes_its_events(make_settings: Any, redis_url: str, prefix: str) -> None:
    """Deterministic half of the partition test: the finish fails (connection lost), the
    background publisher keeps flushing, the retry is refused: no job.completed at all."""
    import redis.asyncio as aioredis

    settings = make_settings(worker_backend="arq")
    conn = aioredis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    publisher = EventPublisher(conn, keys, maxlen=1000)
    publisher.start()
    spec = Registry.discover(settings.queue_packages).queue("contract")
    worker = WorkerContext(queue="contract", engine="arq", worker_id="a", instance="a~1")
    store = LosesFirstFinish(conn, keys)
    runtime = JobRuntime(spec, resolve(spec, settings, processes=1), store,
                         MiddlewareChain([EventPublishMiddleware(publisher)]), worker, publisher)
    try:
        client = WorkerClient(settings)
        await client.enqueue("add", 1, 2, _job_id="refused-1", _delay=3600)
        raw = (await conn.zrange(keys.delayed("contract"), 0, -1))[0]
        await conn.zrem(keys.delayed("contract"), raw)
        await client.close()
        env = Envelope.decode(raw)
        assert await store.claim(env, "a", "a~1", "arq", "a~1:0") == (True, 1)
        # Meanwhile another worker took the job over (as the reaper's requeue + a new claim do).
        await conn.hset(keys.job(env.id), mapping={"owner": "b~1", "worker": "b"})
        job = JobContext(job_id=env.id, task="add", queue="contract", engine="arq", attempt=1, max_tries=3,
                         enqueued_at=0, worker_id="a", worker=worker)
        await runtime._finish(env, job, "completed", result=3)
        publisher.emit("worker.stopped", worker_id="a")  # flushed after anything buffered before it

        async def flushed() -> bool:
            return publisher.sent >= 1

        await until(flushed, 10, what="the background flush")
        written = [f[b"type"] for _, f in await conn.xrange(keys.events)]
        assert written == [b"job.enqueued", b"job.started", b"worker.stopped"], written
        assert store.lost == 1 and publisher.refused == 1
    finally:
        await publisher.close(timeout=5)
        runtime.close()
        await conn.aclose()


# 4. a poison entry in the delayed set ----------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_poison_entry_in_the_delayed_set_traps_nothing(
    engine: str, client: WorkerClient, start_worker: Any,
) -> None:
    keys = client.keys
    delayed = keys.delayed("contract")
    await client.redis.zadd(delayed, {b"\xff\xfe": 0, b'{"id": "half-a-job", "task": 7}': 1})
    jobs = [await client.enqueue("add", i, 1, _delay=0.05) for i in range(20)]
    start_worker("contract", engine)
    results = await asyncio.wait_for(asyncio.gather(*(j.result(TIMEOUT) for j in jobs)), TIMEOUT + 5)
    assert results == [i + 1 for i in range(20)]
    assert await client.redis.zcard(delayed) == 0
    failed = [e for _, e in await events(client) if e["type"] == "job.failed"]
    assert sorted(e["job_id"] for e in failed) == ["", "half-a-job"], failed
    assert all(e["error"].startswith("MalformedMessage: undecodable delayed entry") for e in failed)
    assert all(e["queue"] == "contract" and e["backend"] == engine for e in failed)


# 5. health: consumer state, refused heartbeats, clean stops -------------------------------------


async def test_consumer_state_follows_keep_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "SETTLE_S", 0.2)
    state = ConsumerState()
    calls = 0
    healthy_again = asyncio.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionError("NOPERM this user has no permissions to run the 'info' command")
        healthy_again.set()
        await stop.wait()

    monkeypatch.setattr(asyncio, "sleep", _no_wait(asyncio.sleep))  # skip the restart backoff
    task = asyncio.create_task(keep_running("test", serve, stop.is_set, state))
    await asyncio.wait_for(healthy_again.wait(), 10)
    assert state.as_dict()["consumer"] == "restarting" and "NOPERM" in state.as_dict()["consumer_error"]
    assert state.restarts == 2

    async def running() -> bool:
        return state.state == "running"

    await until(running, 10, what="the consumer to count as running again")
    assert state.as_dict() == {"consumer": "running", "consumer_error": ""}
    stop.set()
    await asyncio.wait_for(task, 10)


def _no_wait(real_sleep: Any) -> Any:
    async def sleep(delay: float, *args: Any) -> Any:
        return await real_sleep(min(delay, 0.01), *args)

    return sleep


def test_worker_whose_consumer_keeps_failing_is_unhealthy(
    env: dict[str, str], start_worker: Any, redis_url: str, prefix: str,
) -> None:
    """Issue 11.19: arq under an ACL without INFO restarts its consumer forever while its
    heartbeat is fresh. It must not count as healthy, and the reason must be shown."""
    admin = sync_redis.Redis.from_url(redis_url)
    user = f"noinfo-{prefix}"
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-info", "-zrangebyscore"])
    worker = None
    try:
        worker = start_worker("contract", "arq", "--id", "deaf", wait=False, redis_username=user,
                              redis_password="pw", **FAST)

        def restarting() -> bool:
            assert worker.proc.poll() is None, "the worker exited"
            beat = beat_of(admin, prefix, "deaf")
            return bool(beat and beat.get("consumer") == "restarting")

        wait_until(restarting, 30, what="the heartbeat to report the consumer restarting")
        cli_env = {**env, "WORKER_BACKEND": "arq"}
        rows = json.loads(cli(cli_env, "workers", "--json").stdout)
        assert [(r["worker_id"], r["state"]) for r in rows] == [("deaf", "unhealthy")]
        assert rows[0]["reason"].startswith("engine consumer restarting (")
        health = cli(cli_env, "health", "contract")
        assert health.returncode == 1
        assert "deaf unhealthy (engine consumer restarting" in health.stderr and "Traceback" not in health.stderr
    finally:
        if worker is not None:
            worker.stop(signal.SIGKILL)  # nothing to drain: it never consumed
        admin.acl_deluser(user)
        admin.close()


async def test_heartbeats_refused_by_a_full_redis_say_so(make_settings: Any, prefix: str) -> None:
    server = RedisServer(free_port()).start()
    conn = sync_redis.Redis.from_url(server.url)
    aconn = None
    try:
        import redis.asyncio as aioredis

        aconn = aioredis.Redis.from_url(server.url)
        keys = Keys(prefix)
        settings = make_settings(redis_url=server.url, worker_heartbeat_interval=0.02, worker_offline_after=3)
        heartbeat = Heartbeat(sync_redis.Redis.from_url(server.url), keys, settings, queue="contract",
                              engine="arq", worker_id="w", instance="w~1", labels={}, concurrency=1, counters=dict)
        heartbeat.beat()
        conn.config_set("maxmemory", 1)  # noeviction (the default): every write is refused
        heartbeat.start()

        async def refused() -> bool:
            return heartbeat.failures >= 1

        await until(refused, 10, what="a refused heartbeat")
        assert heartbeat.last_error.startswith(OOM_REASON), heartbeat.last_error
        rows = await list_workers(aconn, keys, Thresholds(warning=0.0, unhealthy=1, offline=3), "contract")
        assert [(r["worker_id"], r["state"], r["reason"]) for r in rows] == [("w", "warning", OOM_REASON)]
        conn.config_set("maxmemory", 0)

        async def beating_again() -> bool:
            return heartbeat.failures == 0

        await until(beating_again, 10, what="heartbeats once memory is free")
        await heartbeat.stop()
    finally:
        conn.close()
        if aconn is not None:
            await aconn.aclose()
        server.cleanup()


def test_sigterm_lists_a_worker_as_stopped_and_sigkill_as_offline(
    env: dict[str, str], start_worker: Any, redis_url: str, prefix: str,
) -> None:
    cli_env = {**env, "WORKER_OFFLINE_AFTER": "1", "WORKER_WARNING_AFTER": "0.2", "WORKER_UNHEALTHY_AFTER": "0.5"}
    calm = start_worker("contract", "arq", "--id", "calm", wait=False, worker_heartbeat_interval="0.2")
    killed = start_worker("contract", "arq", "--id", "killed", wait=False, worker_heartbeat_interval="0.2")
    conn = sync_redis.Redis.from_url(redis_url)
    wait_until(lambda: beat_of(conn, prefix, "calm") and beat_of(conn, prefix, "killed"), 30, what="two heartbeats")
    conn.close()
    rows = json.loads(cli(cli_env, "workers", "--json").stdout)
    assert {r["worker_id"] for r in rows} == {"calm", "killed"}
    calm.stop()
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(10)

    def states() -> dict[str, str] | None:
        rows = json.loads(cli(cli_env, "workers", "--json").stdout)
        found = {r["worker_id"]: r["state"] for r in rows}
        return found if found.get("killed") == "offline" else None

    found = wait_until(states, 20, interval=0.1, what="the killed worker to be offline")
    assert found == {"calm": "stopped", "killed": "offline"}
    health = cli(cli_env, "health", "contract")
    assert health.returncode == 1 and "calm stopped" in health.stderr and "killed offline" in health.stderr


# the fault helper itself ------------------------------------------------------------------------


def test_tcp_proxy_cuts_and_restores(redis_url: str) -> None:
    """``tests.faults.TcpProxy``: "close" fails at once, "blackhole" only by timeout, restore works."""
    from redis.exceptions import ConnectionError as SyncConnectionError
    from redis.exceptions import TimeoutError as SyncTimeoutError

    with TcpProxy(redis_url) as proxy:
        conn = sync_redis.Redis.from_url(proxy.url, socket_timeout=0.3, socket_connect_timeout=0.3)
        assert conn.ping()
        proxy.cut()
        with pytest.raises(SyncConnectionError):
            conn.ping()
        proxy.restore()
        assert conn.ping()
        proxy.cut("blackhole")
        with pytest.raises((SyncTimeoutError, SyncConnectionError)):
            conn.ping()
        proxy.restore()
        conn.connection_pool.disconnect()  # the blackholed connection stays dead; a new one works
        assert conn.ping()
        conn.close()
