"""Idle cost and pickup latency of one worker process per engine.

For each engine: one ``app worker`` (queue ``idle``, 10 slots) on a private redis-server; after
it settles, the Redis commands it makes per second while the queue is empty (``INFO
commandstats`` delta over ``--seconds``, by command), then the pickup latency of ``--jobs``
single jobs enqueued one at a time into the idle worker (``job.enqueued`` -> ``job.started``
in the event stream, same host, ms).

    python bench/idle.py                      # the code of this checkout
    python bench/idle.py --code /path/to/app  # another checkout (e.g. before a change)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent

QUEUE_MODULE = '''
async def noop() -> None:
    return None


class WorkerSettings:
    functions = [noop]
    queue_name = "idle"
    max_jobs = 10
'''


def _calls(r: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def _wait_beat(r: redis.Redis, prefix: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not r.keys(f"{prefix}:heartbeat:idle:*"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start (exit {proc.poll()})")
        time.sleep(0.05)


async def _pickup(url: str, prefix: str, engine: str, jobs: int) -> list[float]:
    from app.components.worker.api import WorkerClient
    from app.core.settings import load_settings

    settings = load_settings(_env_file=None, redis_url=url, worker_key_prefix=prefix, worker_backend=engine,
                             worker_queue_packages="idle_queues")
    client = WorkerClient(settings)
    rng = random.Random(1)
    ids = []
    try:
        for _ in range(jobs):
            job = await client.enqueue("noop", _queue="idle")
            ids.append(job.job_id)
            await job.result(10)
            await asyncio.sleep(rng.uniform(0.02, 0.05))  # the worker goes back to its idle wait
    finally:
        await client.close()
    r = redis.Redis.from_url(url, decode_responses=True)
    enqueued: dict[str, int] = {}
    started: dict[str, int] = {}
    for _, fields in r.xrange(f"{prefix}:events"):
        if fields.get("type") == "job.enqueued":
            enqueued[fields["job_id"]] = int(fields["ts"])
        elif fields.get("type") == "job.started":
            started.setdefault(fields["job_id"], int(fields["ts"]))
    r.close()
    return [started[i] - enqueued[i] for i in ids if i in started and i in enqueued]


def measure(engine: str, url: str, code: Path, seconds: float, jobs: int, packages: Path) -> dict[str, Any]:
    prefix = f"idle{engine}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WORKER_"))}
    env.update({"REDIS_URL": url, "WORKER_KEY_PREFIX": prefix, "WORKER_QUEUE_PACKAGES": "idle_queues",
                "PYTHONPATH": f"{code}{os.pathsep}{packages}", "LOG_LEVEL": "WARNING"})
    proc = subprocess.Popen([sys.executable, "-m", "app", "worker", "idle", "--backend", engine], env=env, cwd=code)
    r = redis.Redis.from_url(url)
    try:
        _wait_beat(r, prefix, proc)
        time.sleep(2)  # settle: startup calls are not idle cost
        before, t0 = _calls(r), time.monotonic()
        time.sleep(seconds)
        after, t1 = _calls(r), time.monotonic()
        per_command = {c: (after[c] - before.get(c, 0)) / (t1 - t0) for c in after}
        per_command["info"] = max(0.0, per_command.get("info", 0) - 1 / (t1 - t0))  # our own INFO
        busy = {c: round(v, 1) for c, v in sorted(per_command.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        latencies = sorted(asyncio.run(_pickup(url, prefix, engine, jobs)))
    finally:
        proc.terminate()
        proc.wait(30)
        r.close()
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else None
    return {"engine": engine, "idle_calls_per_s": round(sum(busy.values()), 1), "by_command": busy,
            "pickup_ms_p50": statistics.median(latencies) if latencies else None, "pickup_ms_p99": p99,
            "pickup_ms_max": latencies[-1] if latencies else None, "slowest": latencies[-8:], "jobs": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose app/ is measured")
    parser.add_argument("--engines", default="arq,dramatiq,taskiq")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))  # producer and workers run the same code
    from app.core.redis_server import RedisServer

    server = RedisServer().start()
    with tempfile.TemporaryDirectory() as packages:
        (Path(packages) / "idle_queues").mkdir()
        (Path(packages) / "idle_queues" / "__init__.py").write_text("")
        (Path(packages) / "idle_queues" / "idle.py").write_text(QUEUE_MODULE)
        sys.path.insert(0, packages)
        try:
            rows = [measure(e, server.url, args.code.resolve(), args.seconds, args.jobs, Path(packages))
                    for e in args.engines.split(",")]
        finally:
            server.cleanup()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
