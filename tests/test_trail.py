"""The trail every job and worker leaves, as a user and an operator check it.

- worker.started / worker.stopped around a worker's jobs, on every engine;
- health states of a killed worker (healthy -> warning -> unhealthy -> offline) through
  `app workers --json` and `app health`, labels and ids, on every engine;
- queue metrics (ready, delayed, running, per minute) against a known set of jobs, on every engine;
- a Redis outage: the worker survives, jobs and events resume, on every engine;
- `app events --json` (one job, and --follow);
- the event publisher: batching, buffering while Redis is unreachable, and a job's own
  events never written in the background (only by the script of its state change);
- no event lost by --follow between two reads; a heartbeat that beats again at once after
  a long outage.

No sleeps where an event can be awaited; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from app.components.worker.api import WorkerClient
from app.components.worker.events import FIELDS, EventPublisher, read_events
from app.components.worker.health import Heartbeat
from app.components.worker.keys import Keys
from app.core.redis_server import RedisServer, free_port
from app.core.settings import load_settings
from tests.conftest import BASE_ENV, ROOT, WorkerProcess, wait_until

ENGINES = ["arq", "dramatiq", "taskiq"]
RESULT_TIMEOUT = 30
WORKER_JSON_KEYS = {"worker_id", "queue", "engine", "group", "state", "reason", "labels", "last_beat_age_s", "running",
                    "done", "failed"}
QUEUE_JSON_KEYS = {"queue", "engine", "ready", "delayed", "running", "failed", "per_minute", "workers", "paused",
                   "routed", "waiting_by_group", "max_concurrency", "leases"}


def app(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def app_json(env: dict[str, str], *args: str) -> Any:
    proc = app(env, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def stream(redis_url: str, prefix: str, **filters: str) -> list[dict[str, str]]:
    """Every event of this test's prefix, oldest first, optionally filtered by field values."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries = client.xrange(Keys(prefix).events)
    finally:
        client.close()
    events = [fields for _, fields in entries]
    return [e for e in events if all(e.get(k) == v for k, v in filters.items())]


def wait_for_events(redis_url: str, prefix: str, timeout: float = 20, **filters: str) -> list[dict[str, str]]:
    return wait_until(lambda: stream(redis_url, prefix, **filters), timeout,
                      what=f"an event with {filters}")  # type: ignore[return-value]


class LineReader:
    """Lines of a subprocess's stdout, each read with a timeout (a thread feeds a queue)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue_mod.Queue[str | None] = queue_mod.Queue()
        assert proc.stdout is not None
        out = proc.stdout

        def pump() -> None:
            for line in out:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float) -> str | None:
        """The next line, or None when none came within ``timeout`` (or the output ended)."""
        try:
            return self.lines.get(timeout=timeout)
        except queue_mod.Empty:
            return None


# 1. worker.started / worker.stopped ----------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_worker_started_and_stopped_frame_its_jobs(
    engine: str, make_settings: Any, start_worker: Any, redis_url: str, prefix: str
) -> None:
    worker = start_worker("contract", engine)
    worker_id = f"{socket.gethostname()}@{worker.proc.pid}"
    started = wait_for_events(redis_url, prefix, type="worker.started", worker_id=worker_id)
    assert len(started) == 1
    assert started[0]["queue"] == "contract" and started[0]["backend"] == engine
    assert set(started[0]) == set(FIELDS)
    assert started[0]["job_id"] == "" and int(started[0]["ts"]) > 0

    client = WorkerClient(make_settings(worker_backend=engine))
    try:
        job = await client.enqueue("add", 1, 2, _queue="contract")
        assert await job.result(RESULT_TIMEOUT) == 3
    finally:
        await client.close()

    assert worker.stop(signal.SIGTERM) == 0
    # The worker writes its buffered events before it exits: no waiting needed now.
    mine = stream(redis_url, prefix, worker_id=worker_id)
    types = [e["type"] for e in mine]
    assert types == ["worker.started", "job.started", "job.completed", "worker.stopped"], types
    stopped = mine[-1]
    assert stopped["queue"] == "contract" and stopped["backend"] == engine and stopped["job_id"] == ""
    assert int(stopped["ts"]) >= int(started[0]["ts"])
    assert [e["type"] for e in stream(redis_url, prefix, job_id=job.job_id)] == [
        "job.enqueued", "job.started", "job.completed"]


# 2. health states, labels, ids ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_killed_worker_goes_warning_unhealthy_offline(
    engine: str, env: dict[str, str], start_worker: Any
) -> None:
    cli_env = {**env, "WORKER_BACKEND": engine, "WORKER_WARNING_AFTER": "1", "WORKER_UNHEALTHY_AFTER": "2",
               "WORKER_OFFLINE_AFTER": "3"}
    worker = start_worker("contract", engine, "--id", "my-worker", "--label", "gpu=true", "--label", "region=eu",
                          worker_labels="team=core", worker_heartbeat_interval="0.2")

    rows = app_json(cli_env, "workers")
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == WORKER_JSON_KEYS
    assert row["worker_id"] == "my-worker" and row["queue"] == "contract" and row["engine"] == engine
    assert row["state"] == "healthy"
    assert row["labels"] == {"gpu": "true", "region": "eu", "team": "core"}
    assert row["running"] == 0 and row["done"] == 0 and row["failed"] == 0
    assert 0 <= row["last_beat_age_s"] < 1
    assert [r["worker_id"] for r in app_json(cli_env, "workers", "--queue", "contract")] == ["my-worker"]
    assert app_json(cli_env, "workers", "--queue", "load_test") == []

    healthy = app(cli_env, "health", "contract")
    assert healthy.returncode == 0, healthy.stderr
    assert "1 healthy worker" in healthy.stdout

    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(10)

    seen: list[str] = []

    def next_state() -> bool:
        rows = app_json(cli_env, "workers")
        assert [r["worker_id"] for r in rows] == ["my-worker"]
        state = rows[0]["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "offline"

    wait_until(next_state, timeout=20, interval=0.02, what="the killed worker to be listed offline")
    assert seen in (["healthy", "warning", "unhealthy", "offline"], ["warning", "unhealthy", "offline"]), seen

    sick = app(cli_env, "health", "contract")
    assert sick.returncode == 1
    lines = [line for line in sick.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in sick.stderr, sick.stderr
    assert "no healthy worker" in lines[0] and "my-worker offline" in lines[0]


# 3. queue metrics --------------------------------------------------------------------------------


def poll(predicate: Callable[[], Any], timeout: float, what: str, last: dict[str, Any]) -> Any:
    """``wait_until`` that names the last value seen when it gives up."""
    try:
        return wait_until(predicate, timeout, interval=0.05, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {last.get('row')}") from None


def contract_row(env: dict[str, str]) -> dict[str, Any]:
    rows = app_json(env, "queues")
    for row in rows:
        assert set(row) == QUEUE_JSON_KEYS, row
    (row,) = [r for r in rows if r["queue"] == "contract"]
    return row


@pytest.mark.parametrize("engine", ENGINES)
async def test_queue_metrics_match_known_jobs(
    engine: str, env: dict[str, str], make_settings: Any, start_worker: Any, tmp_path: Path
) -> None:
    cli_env = {**env, "WORKER_BACKEND": engine}
    client = WorkerClient(make_settings(worker_backend=engine))
    try:
        ready_jobs = [await client.enqueue("add", i, 1, _queue="contract") for i in range(3)]
        for i in range(2):
            await client.enqueue("add", i, 2, _queue="contract", _delay=60)
        row = contract_row(cli_env)
        assert row["engine"] == engine
        assert (row["ready"], row["delayed"], row["running"], row["failed"]) == (3, 2, 0, 0), row
        assert row["per_minute"] == {"completed": 0, "failed": 0} and row["workers"] == 0

        # Two slots, three jobs that block until the test opens their gate: two run, one waits,
        # whatever the engine prefetches.
        start_worker("contract", engine, "--threads", "2")
        assert [await j.result(RESULT_TIMEOUT) for j in ready_jobs] == [1, 2, 3]
        gates = [tmp_path / f"gate{i}" for i in range(3)]
        gated = [await client.enqueue("wait_for_file", str(g), _queue="contract") for g in gates]
        last: dict[str, Any] = {}

        def figures(row: dict[str, Any]) -> tuple[int, ...]:
            return (row["ready"], row["delayed"], row["running"], row["failed"], row["per_minute"]["completed"],
                    row["per_minute"]["failed"], row["workers"])

        def two_running() -> bool:
            row = last["row"] = contract_row(cli_env)
            return figures(row) == (1, 2, 2, 0, 3, 0, 1)

        poll(two_running, RESULT_TIMEOUT, "ready 1, delayed 2, running 2, 3 completed", last)

        for gate in gates:
            gate.write_text("go")
        assert [await j.result(RESULT_TIMEOUT) for j in gated] == ["released"] * 3

        def all_done() -> bool:
            row = last["row"] = contract_row(cli_env)
            return figures(row) == (0, 2, 0, 0, 6, 0, 1)

        poll(all_done, RESULT_TIMEOUT, "ready 0, delayed 2, running 0, 6 completed", last)
    finally:
        await client.close()


# 4. a Redis outage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_worker_survives_a_redis_restart(engine: str, prefix: str, tmp_path: Path) -> None:
    server = RedisServer(free_port(), aof=True).start()
    worker: WorkerProcess | None = None
    client: WorkerClient | None = None
    try:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "REDIS_"))},
               **BASE_ENV, "REDIS_URL": server.url, "WORKER_KEY_PREFIX": prefix, "PYTHONPATH": str(ROOT),
               "WORKER_BACKEND": engine}
        worker = WorkerProcess(["contract", "--backend", engine, "--id", "survivor"], env)
        settings = load_settings(_env_file=None, redis_url=server.url, worker_key_prefix=prefix,
                                 worker_backend=engine,
                                 worker_queue_packages=BASE_ENV["WORKER_QUEUE_PACKAGES"])
        client = WorkerClient(settings)
        sync = redis.Redis.from_url(server.url)
        wait_until(lambda: worker.proc.poll() is None and sync.exists(f"{prefix}:heartbeat:contract:survivor"),
                   30, what="the worker's heartbeat")
        sync.close()
        first = await client.enqueue("add", 1, 1, _queue="contract")
        assert await first.result(RESULT_TIMEOUT) == 2

        server.stop()
        # Nothing to await while Redis is down: watch the worker for a few heartbeat intervals.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode} while Redis was down"
            time.sleep(0.05)
        server.start()

        # The producer's pooled connections died with the server: its first call retries on
        # a fresh connection (app/core/redis.py), so the enqueue just works.
        second = await client.enqueue("add", 20, 22, _queue="contract")
        assert await second.result(RESULT_TIMEOUT) == 42
        assert worker.proc.poll() is None

        async def trail() -> list[str]:
            return [e["type"] async for e in read_events(client.redis, client.keys, job_id=second.job_id)]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (types := await trail()) != ["job.enqueued", "job.started", "job.completed"]:
            assert loop.time() < deadline, types
            await asyncio.sleep(0.02)
        # The first job's events were written before the outage and survived it (AOF).
        assert [e["type"] async for e in read_events(client.redis, client.keys, job_id=first.job_id)] == [
            "job.enqueued", "job.started", "job.completed"]
        # The heartbeat resumed too.
        async def beating_again() -> bool:
            raw = await client.redis.get(client.keys.heartbeat("contract", "survivor"))
            return raw is not None and time.time() - json.loads(raw)["last_beat"] < 1.0

        deadline = loop.time() + 20
        while not await beating_again():
            assert loop.time() < deadline, "the heartbeat did not resume"
            await asyncio.sleep(0.05)
        assert worker.stop(signal.SIGTERM) == 0
    finally:
        if client is not None:
            await client.close()
        if worker is not None:
            worker.stop(signal.SIGTERM)
        server.cleanup()


# 5. `app events` --------------------------------------------------------------------------------------


def test_events_of_one_job_as_json_lines(env: dict[str, str], start_worker: Any) -> None:
    start_worker("contract", "arq")
    job_id = app(env, "enqueue", "flaky", "--queue", "contract", "--", "succeed_on=2").stdout.strip()
    assert app(env, "result", job_id, "--wait", "--timeout", "30").returncode == 0

    def complete() -> list[dict[str, str]] | None:
        proc = app(env, "events", "--json", "--job", job_id)
        assert proc.returncode == 0, proc.stderr
        events = [json.loads(line) for line in proc.stdout.splitlines()]
        return events if events and events[-1]["type"] == "job.completed" else None

    events = wait_until(complete, 20, what="the job's events")
    assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.retried", "job.started",
                                           "job.completed"]
    for event in events:
        assert set(event) == set(FIELDS) and event["job_id"] == job_id and event["task"] == "flaky"
    assert [int(e["ts"]) for e in events] == sorted(int(e["ts"]) for e in events)
    assert events[2]["error"] == "RuntimeError: attempt 1 fails"
    assert [e["attempt"] for e in events] == ["0", "1", "1", "2", "2"]


def test_events_follow_shows_a_job_enqueued_afterwards(
    env: dict[str, str], start_worker: Any, redis_url: str, prefix: str
) -> None:
    start_worker("contract", "arq")
    follower = subprocess.Popen([sys.executable, "-m", "app", "events", "--follow", "--json"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reader = LineReader(follower)
        # The follower reads from "$" (only new events): prove it is listening by writing
        # markers until one comes out, so the job below cannot slip in before it.
        client = redis.Redis.from_url(redis_url)
        try:
            def listening() -> bool:
                client.xadd(Keys(prefix).events, {"type": "test.marker", "ts": "0"})
                line = reader.next(0.5)
                return line is not None and json.loads(line)["type"] == "test.marker"

            wait_until(listening, 30, interval=0, what="the follower to print a marker")
        finally:
            client.close()
        job_id = app(env, "enqueue", "add", "--queue", "contract", "--", "a=2", "b=3").stdout.strip()
        assert job_id

        mine: list[dict[str, str]] = []
        deadline = time.monotonic() + RESULT_TIMEOUT
        while not mine or mine[-1]["type"] != "job.completed":
            line = reader.next(max(0.0, deadline - time.monotonic()))
            assert line is not None, f"follower printed no more lines; got {mine}"
            event = json.loads(line)
            if event.get("job_id") == job_id:
                assert set(event) == set(FIELDS)
                mine.append(event)
        assert [e["type"] for e in mine] == ["job.enqueued", "job.started", "job.completed"]
        assert follower.poll() is None
    finally:
        follower.terminate()
        follower.wait(10)


# 6. the publisher ------------------------------------------------------------------------------------


class CountingPublisher(EventPublisher):
    flushes = 0

    async def _flush_batch(self) -> None:
        await super()._flush_batch()
        self.flushes += 1


async def test_publisher_batches_ten_thousand_events(redis_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    conn = aioredis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    publisher = CountingPublisher(conn, keys, maxlen=100_000)
    publisher.start()
    try:
        for i in range(10_000):
            publisher.emit("job.enqueued", queue="contract", backend="arq", job_id=f"j{i}", task="add", attempt=1)
        await publisher.close(timeout=30)
        assert publisher.sent == 10_000 and publisher.dropped == 0 and not publisher.buffer
        assert await conn.xlen(keys.events) == 10_000
        # One pipeline per batch of up to 500, not one round trip per event.
        assert 20 <= publisher.flushes <= 40, publisher.flushes
        first = await conn.xrange(keys.events, count=1)
        last = await conn.xrevrange(keys.events, count=1)
        assert first[0][1][b"job_id"] == b"j0" and last[0][1][b"job_id"] == b"j9999"
    finally:
        await conn.aclose()


async def test_publisher_keeps_events_while_redis_is_down(prefix: str) -> None:
    import redis.asyncio as aioredis

    server = RedisServer(free_port(), aof=True).start()
    conn = aioredis.Redis.from_url(server.url, socket_connect_timeout=2)
    keys = Keys(prefix)
    publisher = EventPublisher(conn, keys, maxlen=1000)
    publisher.start()
    try:
        publisher.emit("worker.started", queue="contract", backend="arq", worker_id="w")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while publisher.sent < 1:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)

        server.stop()
        for i in range(100):  # never raises, never waits on Redis: emit only appends to the buffer
            publisher.emit("job.enqueued", queue="contract", backend="arq", job_id=f"j{i}")
        assert len(publisher.buffer) == 100
        deadline = loop.time() + 10
        while publisher.failures < 1:  # the publisher tried, failed, and kept the events
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert len(publisher.buffer) == 100 and publisher.sent == 1 and publisher.dropped == 0

        server.start()
        deadline = loop.time() + 20
        while publisher.sent < 101:
            assert loop.time() < deadline, (publisher.sent, publisher.failures)
            await asyncio.sleep(0.01)
        assert not publisher.buffer and publisher.dropped == 0
        ids = [f[b"job_id"] for _, f in await conn.xrange(keys.events)]
        assert ids == [b""] + [f"j{i}".encode() for i in range(100)]
    finally:
        await publisher.close(timeout=5)
        await conn.aclose()
        server.cleanup()


# 7. no gap in --follow, heartbeats come back at once ------------------------------------------


class GapRedis:
    """A client whose first XREAD comes back empty and an event lands right after it, before
    the next XREAD is sent: the moment a follower reading from ``$`` each time would miss."""

    def __init__(self, real: Any, stream: str) -> None:
        self.real = real
        self.stream = stream
        self.xreads = 0

    async def xread(self, streams: dict[str, str], **kwargs: Any) -> Any:
        self.xreads += 1
        result = await self.real.xread(streams, **kwargs)
        if self.xreads == 1:
            assert not result
            await self.real.xadd(self.stream, {"type": "job.enqueued", "job_id": "in-the-gap"})
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_follow_misses_no_event_between_reads(redis_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    conn = aioredis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    try:
        await conn.xadd(keys.events, {"type": "job.enqueued", "job_id": "before"})
        gap = GapRedis(conn, keys.events)
        events = read_events(gap, keys, follow=True, start="$", block_ms=50)  # type: ignore[arg-type]
        event = await asyncio.wait_for(events.__anext__(), 10)
        assert event["job_id"] == "in-the-gap"
        await events.aclose()
    finally:
        await conn.aclose()


async def test_heartbeat_backoff_stays_under_the_offline_threshold(make_settings: Any, redis_url: str,
                                                                    prefix: str) -> None:
    """Failed beats back off (1 s, x1.5, 15 s max) but never past a third of the offline
    threshold, so a live worker beats again before anyone can judge it offline."""
    import redis as sync_redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    outage = 40

    class FlakyHeartbeat(Heartbeat):
        calls = 0

        def beat(self, state: str | None = None) -> None:
            self.calls += 1
            if self.calls <= outage and state is None:
                raise RedisConnectionError("Redis is down")
            super().beat(state)

    conn = sync_redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    settings = make_settings(worker_heartbeat_interval=0.02, worker_offline_after=0.3)
    heartbeat = FlakyHeartbeat(
        sync_redis.Redis.from_url(redis_url), keys, settings, queue="contract", engine="arq",
        worker_id="w", instance="w~1", labels={}, concurrency=1, counters=lambda: {"running": 0},
    )
    assert heartbeat.max_backoff == pytest.approx(0.1)
    assert Heartbeat(conn, keys, make_settings(), queue="q", engine="arq", worker_id="x", instance="x~1",
                     labels={}, concurrency=1, counters=dict).max_backoff == 10.0  # 30 s / 3
    heartbeat.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not conn.exists(keys.heartbeat("contract", "w")):
            assert loop.time() < deadline, f"no heartbeat after {heartbeat.calls} tries"
            await asyncio.sleep(0.02)
        assert heartbeat.calls > outage
    finally:
        await heartbeat.stop()
        conn.close()


class GatedRedis:
    """A client whose pipelines wait at ``execute`` until the test lets them go."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def pipeline(self, **kwargs: Any) -> Any:
        pipe = self.real.pipeline(**kwargs)
        execute = pipe.execute

        async def gated_execute(*args: Any, **kw: Any) -> Any:
            self.entered.set()
            await self.release.wait()
            return await execute(*args, **kw)

        pipe.execute = gated_execute
        return pipe


async def test_publisher_never_writes_a_jobs_state_events_in_the_background(redis_url: str, prefix: str) -> None:
    """A job's lifecycle events are held for the script of its state change: the background
    flush never writes them, even while a flush is under way, and ``take`` hands them once."""
    import redis.asyncio as aioredis

    conn = aioredis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    gated = GatedRedis(conn)
    publisher = EventPublisher(gated, keys, maxlen=1000)  # type: ignore[arg-type]
    publisher.start()
    try:
        publisher.emit("worker.started", worker_id="w")
        await asyncio.wait_for(gated.entered.wait(), 10)  # the flush of worker.started is under way
        assert publisher.take("w") == []  # ... and that event is not a job's
        publisher.emit("job.completed", job_id="j1")  # emitted while the flush waits for Redis
        publisher.emit("job.failed", job_id="")  # no job (a malformed message): the background's, after j1's
        gated.release.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while publisher.sent < 2:
            assert loop.time() < deadline, (publisher.sent, list(publisher.buffer), publisher.failures)
            await asyncio.sleep(0.01)
        written = [(f[b"type"], f[b"job_id"]) for _, f in await conn.xrange(keys.events)]
        assert written == [(b"worker.started", b""), (b"job.failed", b"")]
        taken = publisher.take("j1")
        assert [(e["type"], e["job_id"]) for e in taken] == [("job.completed", "j1")]
        assert publisher.take("j1") == []
        publisher.settled(taken, written=False)
        assert publisher.refused == 1 and publisher.failures == 0 and publisher.dropped == 0
    finally:
        await publisher.close(timeout=5)
        await conn.aclose()
