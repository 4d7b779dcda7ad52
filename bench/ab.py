"""Before/after drain of the layer, side by side on one Redis, alternating, with the raw engines.

    git archive OLD --prefix=before/ | tar -x -C /tmp          # a snapshot of the code before
    python bench/ab.py --before /tmp/before --rounds 3 --engines arq,taskiq [--raw]

Each round drains N no-op jobs (one worker process, concurrency 10) through the layer with the
``--before`` code and with this checkout's (``--after``), in alternating order from round to
round, and (``--raw``) through the raw engine as ``bench/run.py`` runs it. On a shared, noisy
machine only ratios measured this way mean something: the table gives the median of the
per-round ratios after/before and layer/raw.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.common import (
    EVENTS,
    HOME,
    ROOT,
    TERMINAL,
    machine,
    pick_redis_server,
    quiet_wait,
    start_redis,
    wait_events_done,
)
from bench.run import Bench
from bench.systems import all_systems
from bench.systems.layer import Layer

RAW = {"arq": "arq-raw-poll", "dramatiq": "dramatiq-raw", "taskiq": "taskiq-raw"}


def cpu_s(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def redis_cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def drain_cpu(bench: Bench, system: Layer, n: int, tag: str) -> dict[str, float]:
    """``Bench.drain`` for the layer, plus the worker's and Redis's CPU per job, counted from
    the first job's start (the worker's start-up is not in it) to the last job's end."""
    bench.prefill(system, "noop", n)
    worker = bench.start_worker(system, 10, "noop", tag, target=n)
    try:
        deadline = time.monotonic() + 60
        while not any(f.get(b"type") in (b"job.started", *TERMINAL) for _, f in bench.r.xrevrange(EVENTS, count=1)):
            worker.check()
            if time.monotonic() > deadline:
                raise TimeoutError("no job started within 60s")
            time.sleep(0.005)
        cpu0, redis0 = cpu_s(worker.pid), redis_cpu_s(bench.r)
        quiet_wait(bench.r, worker, 3 * n, 60 + n / 20)
        cpu1, redis1 = cpu_s(worker.pid), redis_cpu_s(bench.r)
        done = wait_events_done(bench.r, worker, n, 60)
    finally:
        worker.stop()
    span = max(done["last"] - done["first"], 1e-6)
    return {"jobs_s": n / span, "worker_us": (cpu1 - cpu0) / n * 1e6, "redis_us": (redis1 - redis0) / n * 1e6}


class CodeLayer(Layer):
    """The layer on ``engine``, its worker importing the code under ``code``."""

    def __init__(self, engine: str, code: Path, tag: str) -> None:
        super().__init__(engine)
        self.key = f"layer-{engine}-{tag}"
        self.code = code

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        # -P: the worker's working directory (this checkout) must not come before PYTHONPATH
        argv = super().worker_argv(url, concurrency, task)
        return [argv[0], "-P", *argv[1:]]

    def worker_env(self, url: str, concurrency: int, task: str) -> dict[str, str]:
        return {**super().worker_env(url, concurrency, task), "PYTHONPATH": str(self.code)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--engines", default="arq,dramatiq,taskiq")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--raw", action="store_true", help="also drain the raw engine each round")
    args = parser.parse_args()
    logs = HOME / "bench" / "results" / "ab-logs"
    logs.mkdir(parents=True, exist_ok=True)
    binary = pick_redis_server(None)
    server = start_redis(binary)
    os.environ["BENCH_REDIS_URL"] = server.url  # what the raw systems' producers connect to
    raw_systems = {s.key: s for s in all_systems()}
    figures: dict[tuple[str, str], list[float]] = {}
    try:
        bench = Bench(server.url, {}, logs)
        for r in range(args.rounds):
            for engine in args.engines.split(","):
                order = [("before", args.before), ("after", args.after)]
                if r % 2:
                    order.reverse()
                systems = [CodeLayer(engine, code.resolve(), tag) for tag, code in order]
                if args.raw:
                    systems.insert(r % 3 if r % 3 < 2 else 2, raw_systems[RAW[engine]])
                for system in systems:
                    tag = system.key.rsplit("-", 1)[-1] if isinstance(system, CodeLayer) else "raw"
                    if isinstance(system, CodeLayer):
                        got = drain_cpu(bench, system, args.jobs, f"ab{r}")
                        for what in ("worker_us", "redis_us"):
                            figures.setdefault((engine, f"{tag}:{what}"), []).append(got[what])
                        cpu = f"  worker {got['worker_us']:6.0f} us/job  redis {got['redis_us']:5.0f} us/job"
                    else:
                        got, cpu = bench.drain(system, "noop", args.jobs, 10, f"ab{r}"), ""
                    figures.setdefault((engine, tag), []).append(got["jobs_s"])
                    print(f"round {r + 1} {engine:9} {tag:7} {got['jobs_s']:8,.0f} jobs/s{cpu}", flush=True)
    finally:
        server.stop()
    m = machine(binary)
    print(f"\nDrain of {args.jobs} no-op jobs, {args.rounds} alternating rounds, {m['nproc']} cores, "
          f"Redis {m['redis_server']}")
    print("| engine | before jobs/s | after jobs/s | after/before (median of rounds) |"
          + (" raw jobs/s | before/raw | after/raw |" if args.raw else ""))
    print("|---|---:|---:|---:|" + ("---:|---:|---:|" if args.raw else ""))
    for engine in args.engines.split(","):
        b, a = figures[(engine, "before")], figures[(engine, "after")]
        row = (f"| {engine} | {statistics.median(b):,.0f} | {statistics.median(a):,.0f} | "
               f"{statistics.median(x / y for x, y in zip(a, b, strict=False)):.2f} |")
        if args.raw:
            raw = figures[(engine, "raw")]
            row += (f" {statistics.median(raw):,.0f} | {statistics.median(x / y for x, y in zip(b, raw, strict=False)):.2f} | "
                    f"{statistics.median(x / y for x, y in zip(a, raw, strict=False)):.2f} |")
        print(row)
    print("\n| engine | worker CPU us/job before -> after | Redis CPU us/job before -> after |")
    print("|---|---:|---:|")
    for engine in args.engines.split(","):
        cells = [f"{statistics.median(figures[(engine, 'before:' + w)]):,.0f} -> "
                 f"{statistics.median(figures[(engine, 'after:' + w)]):,.0f}" for w in ("worker_us", "redis_us")]
        print(f"| {engine} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
