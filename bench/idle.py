"""Idle cost and pickup latency of one worker process per engine.

For each engine: one ``app worker`` (queue ``idle``, 10 slots) on a private redis-server; after
it settles, the Redis commands it makes per second while the queue is empty (``INFO
commandstats`` delta over ``--seconds``, by command), then the pickup latency of ``--jobs``
single jobs enqueued one at a time into the idle worker (``job.enqueued`` -> ``job.started``
in the event stream, same host, ms), then how late delayed jobs and retries start: ``--late``
jobs with a 0.2 s delay (``job.enqueued`` + 200 ms -> ``job.started``) and as many jobs that
fail once asking for a 0.05 s backoff (``job.retried`` + 50 ms -> the second ``job.started``),
one at a time into the idle worker. Times are the stream ids' (Redis's clock).

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
from app.components.worker import Retry, current_job


async def noop() -> None:
    return None


async def fails_once() -> int:
    if current_job().attempt == 1:
        raise Retry("first attempt fails", delay=0.05)  # an exact backoff: the policy's has jitter
    return current_job().attempt


class WorkerSettings:
    functions = [noop, fails_once]
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


DELAY_MS = 200
BACKOFF_MS = 50


async def _run_jobs(url: str, prefix: str, engine: str, task: str, jobs: int, delay: float = 0) -> list[str]:
    """Enqueue ``jobs`` jobs one at a time, each after the previous one ended; their ids."""
    from app.components.worker.api import WorkerClient
    from app.core.settings import load_settings

    settings = load_settings(_env_file=None, redis_url=url, worker_key_prefix=prefix, worker_backend=engine,
                             worker_queue_packages="idle_queues")
    client = WorkerClient(settings)
    rng = random.Random(1)
    ids = []
    try:
        for _ in range(jobs):
            job = await client.enqueue(task, _queue="idle", _delay=delay)
            ids.append(job.job_id)
            await job.result(10)
            await asyncio.sleep(rng.uniform(0.02, 0.05))  # the worker goes back to its idle wait
    finally:
        await client.close()
    return ids


def _trails(url: str, prefix: str) -> dict[str, list[tuple[str, int]]]:
    """Per job, (event type, stream id ms) in order: stream ids are Redis's clock."""
    r = redis.Redis.from_url(url, decode_responses=True)
    out: dict[str, list[tuple[str, int]]] = {}
    for entry_id, fields in r.xrange(f"{prefix}:events"):
        if fields.get("job_id"):
            out.setdefault(fields["job_id"], []).append((fields["type"], int(entry_id.split("-")[0])))
    r.close()
    return out


def _after(trail: list[tuple[str, int]], first: str, then: str) -> int | None:
    """ms from the first ``first`` event to the next ``then`` event after it."""
    at = next((n for n, (t, _) in enumerate(trail) if t == first), None)
    if at is None:
        return None
    return next((ms - trail[at][1] for t, ms in trail[at + 1:] if t == then), None)


async def _pickup(url: str, prefix: str, engine: str, jobs: int) -> list[float]:
    ids = await _run_jobs(url, prefix, engine, "noop", jobs)
    trails = _trails(url, prefix)
    waits = [_after(trails.get(i, []), "job.enqueued", "job.started") for i in ids]
    return [w for w in waits if w is not None]


async def _late(url: str, prefix: str, engine: str, jobs: int) -> tuple[list[int], list[int]]:
    """How late (ms) delayed jobs and retries started, past their due time."""
    delayed = await _run_jobs(url, prefix, engine, "noop", jobs, delay=DELAY_MS / 1000)
    retried = await _run_jobs(url, prefix, engine, "fails_once", jobs)
    trails = _trails(url, prefix)
    late_delay = [w - DELAY_MS for w in (_after(trails[i], "job.enqueued", "job.started") for i in delayed)
                  if w is not None]
    late_retry = [w - BACKOFF_MS for w in (_after(trails[i], "job.retried", "job.started") for i in retried)
                  if w is not None]
    return sorted(late_delay), sorted(late_retry)


def _p(values: list[int] | list[float], q: float) -> Any:
    return values[max(0, int(len(values) * q) - 1)] if values else None


def measure(engine: str, url: str, code: Path, seconds: float, jobs: int, late: int, packages: Path,
            settle: float = 2.0) -> dict[str, Any]:
    prefix = f"idle{engine}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WORKER_"))}
    env.update({"REDIS_URL": url, "WORKER_KEY_PREFIX": prefix, "WORKER_QUEUE_PACKAGES": "idle_queues",
                "PYTHONPATH": f"{code}{os.pathsep}{packages}", "LOG_LEVEL": "WARNING"})
    proc = subprocess.Popen([sys.executable, "-m", "app", "worker", "idle", "--backend", engine], env=env, cwd=code)
    r = redis.Redis.from_url(url)
    try:
        _wait_beat(r, prefix, proc)
        time.sleep(settle)  # startup calls are not idle cost (a reaper checks ages only after WORKER_OFFLINE_AFTER)
        before, t0 = _calls(r), time.monotonic()
        time.sleep(seconds)
        after, t1 = _calls(r), time.monotonic()
        per_command = {c: (after[c] - before.get(c, 0)) / (t1 - t0) for c in after}
        per_command["info"] = max(0.0, per_command.get("info", 0) - 1 / (t1 - t0))  # our own INFO
        busy = {c: round(v, 1) for c, v in sorted(per_command.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        latencies = sorted(asyncio.run(_pickup(url, prefix, engine, jobs)))
        late_delay, late_retry = asyncio.run(_late(url, prefix, engine, late)) if late else ([], [])
    finally:
        proc.terminate()
        proc.wait(30)
        r.close()
    return {"engine": engine, "idle_calls_per_s": round(sum(busy.values()), 1), "by_command": busy,
            "pickup_ms_p50": statistics.median(latencies) if latencies else None, "pickup_ms_p99": _p(latencies, 0.99),
            "pickup_ms_max": latencies[-1] if latencies else None, "slowest": latencies[-8:], "jobs": len(latencies),
            "delay_late_ms_p50": _p(late_delay, 0.5), "delay_late_ms_max": late_delay[-1] if late_delay else None,
            "retry_late_ms_p50": _p(late_retry, 0.5), "retry_late_ms_max": late_retry[-1] if late_retry else None,
            "late_jobs": len(late_delay) + len(late_retry)}


def run_all(url: str, code: Path, engines: list[str], seconds: float, jobs: int, late: int,
            settle: float = 2.0) -> list[dict[str, Any]]:
    """Every engine in turn on the Redis at ``url`` (each under its own key prefix)."""
    with tempfile.TemporaryDirectory() as packages:
        (Path(packages) / "idle_queues").mkdir()
        (Path(packages) / "idle_queues" / "__init__.py").write_text("")
        (Path(packages) / "idle_queues" / "idle.py").write_text(QUEUE_MODULE)
        sys.path.insert(0, packages)
        try:
            return [measure(e, url, code.resolve(), seconds, jobs, late, Path(packages), settle) for e in engines]
        finally:
            sys.path.remove(packages)


def section(url: str, seconds: float = 10.0, jobs: int = 200, late: int = 20) -> list[str]:
    """The markdown section of ``bench/run.py``: idle cost and pickup of one layer worker process."""
    rows = run_all(url, ROOT, ["arq", "dramatiq", "taskiq"], seconds, jobs, late)
    lines = ["## Idle worker: Redis commands per second and pickup", "",
             f"`bench/idle.py`: one `app worker` process per engine (10 slots, default settings) on an empty queue; "
             f"Redis commands it causes per second over a {seconds:g} s idle window (`INFO commandstats`, including "
             f"commands inside Lua scripts), then {jobs} single jobs enqueued one at a time into the idle worker "
             "(pickup: `job.enqueued` -> `job.started`, stream ids, Redis's clock), then how late 0.2 s delayed "
             "jobs and 50 ms retries start.", "",
             "| engine | idle commands/s per worker process | top commands/s | pickup p50 / p99 / max ms "
             "| 0.2 s delay late p50 / max ms | 50 ms retry late p50 / max ms |",
             "|---|---:|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{k} {v:g}" for k, v in list(r["by_command"].items())[:5])
        lines.append(f"| {r['engine']} | {r['idle_calls_per_s']:.1f} | {top} | {r['pickup_ms_p50']} / "
                     f"{r['pickup_ms_p99']} / {r['pickup_ms_max']} | {r['delay_late_ms_p50']} / {r['delay_late_ms_max']} "
                     f"| {r['retry_late_ms_p50']} / {r['retry_late_ms_max']} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose app/ is measured")
    parser.add_argument("--engines", default="arq,dramatiq,taskiq")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--late", type=int, default=20, help="delayed jobs and retries whose lateness is measured")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after the first beat before the idle window (32: past WORKER_OFFLINE_AFTER, "
                             "the reaper's steady state)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))  # producer and workers run the same code
    from app.core.redis_server import RedisServer

    server = RedisServer().start()
    try:
        rows = run_all(server.url, args.code, args.engines.split(","), args.seconds, args.jobs, args.late,
                       args.settle)
    finally:
        server.cleanup()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
