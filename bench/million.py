"""Operator commands and idle workers with a million jobs waiting (issue 12, #9).

For each engine, on a private Redis (a `redis-server` on a free port, removed at the end):
fill the ``load_test`` queue with N waiting no-op jobs (``enqueue_many``, batches of 10k, no
worker running), then measure

- ``app queues --json`` and ``app dequeue load_test --job ID`` as an operator runs them
  (wall time of the whole command, Python start-up included; ``app --help`` is the floor);
- an idle worker of another queue (``system``) on the same engine and Redis: Redis commands
  per second and Redis CPU per second while it idles, from INFO, over ``--idle-seconds``.
  Work proportional to the backlog on that path (a ``KEYS``, a scan) shows as Redis CPU.

    python bench/million.py                          # 1,000,000 jobs, all three engines
    python bench/million.py --jobs 200000 --engines arq

Memory: ~1 KB of Redis per waiting job (job record + the engine's message); the Redis is
flushed between engines. Writes ``bench/results/million.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.common import WorkerProc, pick_redis_server, start_redis  # noqa: E402

QUEUE = "load_test"
BATCH = 10_000


def env_for(url: str, engine: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WORKER_"))}
    env.update({"REDIS_URL": url, "WORKER_BACKEND": engine, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING",
                "WORKER_EVENTS_MAXLEN": "100000"})
    return env


async def fill(url: str, engine: str, jobs: int) -> tuple[float, str]:
    """Enqueue ``jobs`` no-op jobs; returns (jobs/s, the id of one job in the middle)."""
    from app.components.worker.api import JobRequest, WorkerClient
    from app.core.settings import load_settings

    client = WorkerClient(load_settings(_env_file=None, redis_url=url, worker_backend=engine))
    middle = ""
    started = time.perf_counter()
    try:
        done = 0
        while done < jobs:
            n = min(BATCH, jobs - done)
            handles = await client.enqueue_many([JobRequest("noop", queue=QUEUE)] * n)
            if done <= jobs // 2 < done + n:
                middle = handles[jobs // 2 - done].job_id  # type: ignore[union-attr]
            done += n
            if done % 100_000 == 0:
                print(f"  {engine}: {done:,} enqueued ({done / (time.perf_counter() - started):,.0f}/s)", flush=True)
    finally:
        await client.close()
    return jobs / (time.perf_counter() - started), middle


def timed(env: dict[str, str], *args: str, timeout: float = 600) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "app", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "exit": None, "note": f"timed out after {timeout:g}s"}
    return {"seconds": round(time.perf_counter() - started, 3), "exit": proc.returncode,
            "stdout": proc.stdout, "stderr": proc.stderr[-300:]}


async def in_process(url: str, engine: str, job_id: str) -> dict[str, float]:
    """The same two operations inside one process (no Python start-up, no imports): what
    they cost Redis and the client, in ms; median of 5 (the dequeue of one job: the first
    cancels it, the others find it cancelled and do the same reads)."""
    from app.components.worker.api import WorkerClient
    from app.components.worker.dequeue import cancel_waiting
    from app.components.worker.metrics import queue_metrics
    from app.core.settings import load_settings

    client = WorkerClient(load_settings(_env_file=None, redis_url=url, worker_backend=engine))
    out: dict[str, float] = {}
    try:
        for name, call in (("queues_ms", lambda: queue_metrics(client)),
                           ("dequeue_one_ms", lambda: cancel_waiting(client, QUEUE, job_id))):
            times = []
            for _ in range(5):
                started = time.perf_counter()
                await call()
                times.append((time.perf_counter() - started) * 1000)
            out[name] = round(sorted(times)[2], 1)
    finally:
        await client.close()
    return out


def redis_counters(client: redis.Redis) -> tuple[int, float]:
    stats = client.info("stats")
    cpu = client.info("cpu")
    return int(stats["total_commands_processed"]), float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def idle_load(url: str, env: dict[str, str], engine: str, seconds: float, client: redis.Redis) -> dict[str, Any]:
    """Start a worker of ``system`` (nothing waits there), let it settle, count Redis's work."""
    log = ROOT / "bench" / "results" / "logs" / f"million-idle-{engine}.log"
    worker = WorkerProc([sys.executable, "-m", "app", "worker", "system", "--backend", engine], env, log)
    try:
        deadline = time.monotonic() + 60
        while not client.keys("worker:heartbeat:system:*"):
            worker.check()
            if time.monotonic() > deadline:
                raise RuntimeError("the idle worker never beat")
            time.sleep(0.1)
        time.sleep(3)  # past start-up (engine switch sweep, first reaper pass)
        calls0, cpu0 = redis_counters(client)
        time.sleep(seconds)
        calls1, cpu1 = redis_counters(client)
        worker.check()
    finally:
        worker.stop()
    # our own two INFO calls are in the count: negligible
    return {"calls_per_s": round((calls1 - calls0) / seconds), "redis_cpu_ms_per_s": round((cpu1 - cpu0) * 1000 / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--engines", default="arq,dramatiq,taskiq")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--redis-server", default=None)
    args = parser.parse_args()

    server = start_redis(pick_redis_server(args.redis_server))
    client = redis.Redis.from_url(server.url)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "jobs": args.jobs,
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                   f"Python {platform.python_version()}, Redis {client.info('server')['redis_version']}",
        "engines": {},
    }
    try:
        floor = timed(env_for(server.url, "arq"), "--help")
        results["python_startup_s"] = floor["seconds"]
        for engine in args.engines.split(","):
            client.flushall()
            env = env_for(server.url, engine)
            print(f"{engine}: filling {QUEUE} with {args.jobs:,} jobs", flush=True)
            rate, middle = asyncio.run(fill(server.url, engine, args.jobs))
            row: dict[str, Any] = {"enqueue_per_s": round(rate),
                                   "redis_used_memory_mb": round(client.info("memory")["used_memory"] / 2**20)}
            queues = timed(env, "queues", "--json")
            row["queues_s"] = queues["seconds"]
            if queues.get("exit") == 0:
                row["queues_ready"] = next(r["ready"] for r in json.loads(queues["stdout"]) if r["queue"] == QUEUE)
            else:
                row["queues_error"] = queues.get("note") or queues.get("stderr")
            dequeue = timed(env, "dequeue", QUEUE, "--job", middle)
            row["dequeue_one_s"] = dequeue["seconds"]
            if dequeue.get("exit") != 0:
                row["dequeue_error"] = dequeue.get("note") or dequeue.get("stderr")
            row.update(asyncio.run(in_process(server.url, engine, middle)))
            row["idle_worker"] = idle_load(server.url, env, engine, args.idle_seconds, client)
            results["engines"][engine] = row
            print(f"{engine}: {json.dumps(row)}", flush=True)
    finally:
        client.close()
        server.cleanup()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "million.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['date']}, {results['machine']}; {args.jobs:,} waiting jobs; "
          f"`app --help` takes {results['python_startup_s']} s\n")
    print("| engine | enqueue_many jobs/s | Redis memory | `app queues` (command / in process) "
          "| `app dequeue --job` (command / in process) | idle worker: Redis calls/s | idle worker: Redis CPU ms/s |")
    print("|---|---|---|---|---|---|---|")
    for engine, row in results["engines"].items():
        idle = row["idle_worker"]
        print(f"| {engine} | {row['enqueue_per_s']:,} | {row['redis_used_memory_mb']:,} MB | "
              f"{row['queues_s']} s / {row['queues_ms']} ms | {row['dequeue_one_s']} s / {row['dequeue_one_ms']} ms | "
              f"{idle['calls_per_s']:,} | {idle['redis_cpu_ms_per_s']} |")


if __name__ == "__main__":
    main()
