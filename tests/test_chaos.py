"""Chaos, bounded: SIGKILL worker processes mid-run and restart Redis; nothing may be lost.

Per engine: N jobs of mixed lengths on 3 supervised processes; three SIGKILLs of a random
process (the supervisor restarts it) and one Redis restart (AOF on). Every job must reach
exactly one terminal state, and no job may run more often than it has attempts (a completed
job is never run again). Figures go to bench/results/chaos-<engine>.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from app.components.worker import JobRequest
from app.components.worker.api import WorkerClient
from app.components.worker.events import read_events
from app.core.redis_server import RedisServer
from app.core.settings import load_settings
from tests.conftest import ROOT

JOBS = 240
KILLS = 3


@pytest.fixture
def aof_server() -> Any:
    server = RedisServer(aof=True).start()
    yield server
    server.cleanup()


@pytest.mark.parametrize("engine", ["arq", "dramatiq", "taskiq"])
async def test_chaos(engine: str, aof_server: RedisServer, env: dict[str, str], start_worker: Any, tmp_path: Path,
                     prefix: str) -> None:
    await _run(engine, aof_server, env, start_worker, tmp_path, prefix)


async def _run(engine: str, server: RedisServer, env: dict[str, str], start_worker: Any, tmp_path: Path,
               prefix: str) -> None:
    env["REDIS_URL"] = server.url
    settings = load_settings(_env_file=None, redis_url=server.url, worker_key_prefix=prefix, worker_backend=engine,
                             worker_queue_packages=env["WORKER_QUEUE_PACKAGES"], worker_offline_after=2)
    client = WorkerClient(settings)
    runs = tmp_path / "runs"
    runs.mkdir()
    rng = random.Random(7)
    start_worker("contract", engine, "--processes", "3", "--threads", "4", worker_offline_after="2",
                 worker_heartbeat_interval="0.2", worker_retry_backoff_seconds="0.05")
    requests = [JobRequest("chaos_job", (str(runs), f"j{i}", rng.choice((5, 20, 50, 200, 500)))) for i in range(JOBS)]
    jobs = await client.enqueue_many(requests)
    kills: list[float] = []
    restarted_redis = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 150
    while True:
        finished = await _finished(client, [j.job_id for j in jobs])
        if finished == JOBS:
            break
        assert loop.time() < deadline, f"{engine}: only {finished}/{JOBS} jobs finished"
        if len(kills) < KILLS and finished >= (len(kills) + 1) * JOBS // 5:
            victim = await _random_worker_pid(client, rng)
            if victim:
                os.kill(victim, signal.SIGKILL)
                kills.append(time.time())
        elif len(kills) == KILLS and not restarted_redis and finished >= JOBS * 4 // 5:
            server.stop()
            await asyncio.sleep(0.5)  # Redis stays down a moment while the workers keep trying
            server.start()
            restarted_redis = True
        await asyncio.sleep(0.05)
    await _check(client, jobs, runs, engine, kills)
    await client.close()


async def _finished(client: WorkerClient, ids: list[str]) -> int:
    try:
        async with client.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(client.keys.result(job_id))
            return sum(await pipe.execute())
    except Exception:  # noqa: BLE001 - Redis is being restarted
        return 0


async def _random_worker_pid(client: WorkerClient, rng: random.Random) -> int | None:
    keys = await client.redis.keys(f"{client.keys.prefix}:heartbeat:contract:*")
    beats = [json.loads(v) for v in await client.redis.mget(keys) if v] if keys else []
    live = [b["pid"] for b in beats if b.get("state") != "stopped" and _alive(b["pid"])]
    return rng.choice(live) if live else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


async def _check(client: WorkerClient, jobs: list[Any], runs: Path, engine: str, kills: list[float]) -> None:
    ids = [j.job_id for j in jobs]
    infos = {job_id: await client.job(job_id).info() for job_id in ids}
    terminal: dict[str, int] = {}
    redelivered_starts: list[float] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:  # terminal events are written with the results; read them all
        terminal.clear()
        redelivered_starts.clear()
        async for e in read_events(client.redis, client.keys):
            if e["type"] in ("job.completed", "job.failed") and e["job_id"] in infos:
                terminal[e["job_id"]] = terminal.get(e["job_id"], 0) + 1
            if e["type"] == "job.started" and e["attempt"] not in ("", "1"):
                redelivered_starts.append(int(e["ts"]) / 1000)
        if len(terminal) == len(ids) or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    executions = {job_id: len((runs / f"j{i}").read_text().splitlines()) if (runs / f"j{i}").exists() else 0
                  for i, job_id in enumerate(ids)}
    completed = [i for i in ids if infos[i] and infos[i]["status"] == "completed"]
    failed = [i for i in ids if infos[i] and infos[i]["status"] == "failed"]
    reran = [i for i in ids if infos[i] and executions[i] > infos[i]["attempts"]]
    recovery = [min((s - k for s in redelivered_starts if s > k), default=None) for k in kills]
    report = {
        "engine": engine, "jobs": len(ids), "completed": len(completed), "failed": len(failed),
        "kills": len(kills), "redis_restarts": 1, "redelivered_attempts": len(redelivered_starts),
        "executions": sum(executions.values()), "jobs_run_more_than_once": sum(1 for v in executions.values() if v > 1),
        "completed_job_run_again": len(reran),
        "recovery_s_after_kill": [round(r, 2) if r is not None else None for r in recovery],
        "terminal_events_per_job": sorted(set(terminal.values())),
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"chaos-{engine}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    assert all(infos[i] is not None for i in ids), "a job has no terminal state"
    assert len(completed) + len(failed) == len(ids)
    assert set(terminal.values()) == {1} and len(terminal) == len(ids), "exactly one terminal event per job"
    assert not reran, f"jobs executed more often than their attempts: {reran[:5]}"
    assert all(info["status"] == "completed" or info["error_type"] == "WorkerLost" for info in infos.values())


async def test_dramatiq_fetch_whose_reply_was_lost_runs_once(env: dict[str, str], start_worker: Any,
                                                            tmp_path: Path, prefix: str) -> None:
    """Dramatiq's fetch is one script (ids off the queue, into the fetcher's acks set, then the
    reply). A reply lost in a Redis restart left its messages in a LIVE worker's acks set, where
    nobody ran them until the worker stopped (redis-py's retry even hides the loss from the
    consumer). The worker puts them back after the connection failure; each runs once."""
    import redis

    from app.components.worker.runtime import scripts
    from tests.test_contract import wait_trail

    server = RedisServer(aof=True).start()  # private: it restarts; AOF keeps the state across
    worker = None
    try:
        env["REDIS_URL"] = server.url
        worker = start_worker("contract", "dramatiq")
        settings = load_settings(_env_file=None, redis_url=server.url, worker_key_prefix=prefix,
                                 worker_backend="dramatiq", worker_queue_packages=env["WORKER_QUEUE_PACKAGES"])
        client = WorkerClient(settings)
        r = redis.Redis.from_url(server.url)
        beat = json.loads(r.get(r.keys(f"{prefix}:heartbeat:contract:*")[0]))
        ns = client.keys.engine_namespace("dramatiq")
        acks = f"{ns}:__acks__.{beat['instance']}.contract"
        os.kill(worker.proc.pid, signal.SIGSTOP)  # so that the worker does not fetch the job first
        try:
            job = await client.enqueue("chaos_job", str(tmp_path), "j", 5)
            # The worker's fetch, run for it: the reply that never reaches it.
            lost = r.eval(scripts.source("dramatiq_fetch"), 3, f"{ns}:contract", f"{ns}:contract.msgs", acks, 10)
            assert len(lost) == 2 and r.sismember(acks, lost[0]), lost
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        server.stop()  # the restart that lost the reply: the worker's idle wait fails with it
        server.start()
        assert await job.result(30) == "j"
        events = await wait_trail(client, job.job_id, "job.completed")
        assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.completed"]
        assert len((tmp_path / "j").read_text().splitlines()) == 1  # ran once
        await client.close()
        r.close()
    finally:
        if worker is not None:
            worker.stop()  # before its Redis goes
        server.cleanup()
