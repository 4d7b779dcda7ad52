"""Bulk enqueue (``WorkerClient.enqueue_many``, batches of 1000) before/after a change, per engine.

    git archive OLD --prefix=before/ | tar -x -C /tmp
    python bench/bulk.py --before /tmp/before --jobs 20000 --rounds 3 [--profile]

Each round runs the producer in a fresh subprocess per code tree (``--before``, this checkout),
alternating the order, on one private Redis (flushed between runs), and prints jobs/s, the
producer's CPU µs per job and Redis's CPU µs per job (``INFO cpu``). ``--profile`` writes a
cProfile of this checkout's producer's timed loop (``bench/results/bulk-<engine>.prof``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.common import HOME, ROOT, pick_redis_server, start_redis

PRODUCER = r"""
import asyncio, json, os, resource, sys, time
from app.components.worker.api import JobRequest, WorkerClient
from app.core.settings import load_settings

async def main(url, engine, n, batch, prof):
    values = {"redis_url": url, "worker_backend": engine, "worker_key_prefix": "worker",
              "worker_queue_packages": "app.components.worker.queues"}
    client = WorkerClient(load_settings(_env_file=None, **values))
    await client.enqueue_many([JobRequest("noop", queue="load_test")])  # warm-up: connection, scripts, imports
    if prof:  # the timed loop only
        import cProfile
        profile = cProfile.Profile()
        profile.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, n, batch):
        await client.enqueue_many([JobRequest("noop", queue="load_test") for _ in range(min(batch, n - start))])
    t1, c1 = time.perf_counter(), time.process_time()
    if prof:
        profile.disable()
        profile.dump_stats(prof)
    await client.close()
    print(json.dumps({"jobs_s": n / (t1 - t0), "cpu_us": (c1 - c0) / n * 1e6}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
"""


def run(code: Path, url: str, engine: str, n: int, batch: int, prof: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WORKER_"))}
    env["PYTHONPATH"] = str(code)
    out = subprocess.run([sys.executable, "-P", "-c", PRODUCER, url, engine, str(n), str(batch), prof],
                         env=env, cwd=str(code), capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path)
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--engines", default="arq,dramatiq,taskiq")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    server = start_redis(pick_redis_server(None))
    r = redis.Redis.from_url(server.url)
    figures: dict[tuple[str, str, str], list[float]] = {}
    trees = [("before", args.before), ("after", args.after)] if args.before else [("after", args.after)]
    try:
        for rnd in range(args.rounds):
            for engine in args.engines.split(","):
                order = trees if rnd % 2 == 0 else trees[::-1]
                for tag, code in order:
                    r.flushall()
                    info0 = r.info("cpu")
                    prof = ""
                    if args.profile and tag == "after" and rnd == 0:
                        (HOME / "bench" / "results").mkdir(parents=True, exist_ok=True)
                        prof = str(HOME / "bench" / "results" / f"bulk-{engine}.prof")
                    got = run(code.resolve(), server.url, engine, args.jobs, args.batch, prof)
                    info1 = r.info("cpu")
                    got["redis_us"] = sum(float(info1[k]) - float(info0[k])
                                          for k in ("used_cpu_user", "used_cpu_sys")) / args.jobs * 1e6
                    for what, value in got.items():
                        figures.setdefault((engine, tag, what), []).append(value)
                    print(f"round {rnd + 1} {engine:9} {tag:7} {got['jobs_s']:9,.0f} jobs/s  producer "
                          f"{got['cpu_us']:5.0f} us/job  redis {got['redis_us']:5.0f} us/job", flush=True)
    finally:
        server.stop()
    print(f"\nBulk enqueue of {args.jobs} no-op jobs (enqueue_many, batches of {args.batch}), "
          f"{args.rounds} alternating rounds, median; ended {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
          f"load average {os.getloadavg()[0]:.1f} (1 min)")
    print("| engine | " + " | ".join(f"{t} jobs/s | {t} producer µs/job | {t} Redis µs/job" for t, _ in trees) + " |")
    print("|---|" + "---:|" * (3 * len(trees)))
    for engine in args.engines.split(","):
        cells = [f"{statistics.median(figures[(engine, t, w)]):,.0f}" for t, _ in trees
                 for w in ("jobs_s", "cpu_us", "redis_us")]
        print(f"| {engine} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
