"""Benchmark the layer against the raw engines and the peers, on one private Redis.

    python bench/run.py            # full run (~11 min on 2 cores): writes bench/results/latest.{md,json}
                                   # and the committed copy bench/RESULTS.md
    python bench/run.py --quick    # ~2-3 min, smaller counts, one drain run, no round trips/profile
    python bench/run.py --only layer-arq,arq-raw-poll --runs 1

Per system (one worker process, concurrency 10 unless stated): enqueue jobs/s one at a time
and in bulk (no worker running), drain of N no-op jobs (enqueued first, then the worker is
started; timed from the first job's start to the last job's end), 2000 jobs of a 10 ms async
sleep at concurrency 50, idle pickup latency (enqueue -> the task's own timestamp), worker RSS.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.common import (
    HOME,
    RESULTS,
    ROOT,
    WorkerProc,
    fmt,
    log,
    machine,
    median,
    percentile,
    pick_redis_server,
    quiet_wait,
    snapshot,
    start_redis,
    wait_events_done,
    wait_probe_done,
    worker_env,
    write_json,
)

FULL = {"runs": 3, "drain": 5000, "single": 2000, "bulk": 20000, "sleep": 2000, "latency": 200, "rt_jobs": 2000,
        "profile_jobs": 20000}
QUICK = {"runs": 1, "drain": 2000, "single": 500, "bulk": 5000, "sleep": 1000, "latency": 50, "rt_jobs": 500,
         "profile_jobs": 5000}
SLOW_DIVISOR = 5           # systems that fork per job run a fifth of the jobs
ONE_RUN_IF_SLOWER_S = 20   # a drain run longer than this is not repeated


class Bench:
    def __init__(self, url: str, counts: dict[str, int], logs: Path) -> None:
        self.url = url
        self.counts = counts
        self.logs = logs
        self.r = redis.Redis.from_url(url)

    def flush(self) -> None:
        self.r.flushall()

    def start_worker(self, system: Any, concurrency: int, task: str, scenario: str,
                     target: int = 0) -> WorkerProc:
        env = worker_env(self.url, {"BENCH_TARGET": str(target), "BENCH_COUNT": system.count_mode,
                                    **system.worker_env(self.url, concurrency, task)})
        return WorkerProc(system.worker_argv(self.url, concurrency, task), env,
                          self.logs / f"{system.key}-{scenario}.log")

    def jobs(self, system: Any, n: int) -> int:
        return max(100, n // SLOW_DIVISOR) if system.slow else n

    def enqueue(self, system: Any, task: str, n: int, bulk: bool) -> float:
        """Enqueue n jobs with no worker running; returns jobs/s."""
        self.flush()
        producer = system.producer(self.url)
        try:
            seconds = producer.bulk(task, n) if bulk else producer.single(task, n)
        finally:
            producer.close()
        return n / seconds

    def prefill(self, system: Any, task: str, n: int) -> None:
        self.flush()
        producer = system.producer(self.url)
        try:
            producer.bulk(task, n) if system.bulk_api else producer.single(task, n)
        finally:
            producer.close()

    def drain(self, system: Any, task: str, n: int, concurrency: int, scenario: str) -> dict[str, float]:
        """Enqueue n jobs, then start the worker; jobs/s from first start to last end."""
        self.prefill(system, task, n)
        worker = self.start_worker(system, concurrency, task, scenario, target=n)
        try:
            timeout = 60 + n / 20
            if system.family == "layer":
                # XLEN polls while the worker drains, the events read afterwards: following the
                # stream meanwhile took a share of the two cores a raw drain does not pay (as in ab.py)
                quiet_wait(self.r, worker, 3 * n, timeout)
                done = wait_events_done(self.r, worker, n, timeout)
            else:
                done = wait_probe_done(self.r, worker, timeout)
            rss = worker.rss_mb()
        finally:
            worker.stop()
        span = max(done["last"] - done["first"], 1e-6)
        return {"jobs_s": n / span, "seconds": span, "cold_s": done["last"] - worker.started, "rss_mb": rss, "n": n}

    def latency(self, system: Any, samples: int) -> dict[str, Any]:
        """Pickup latency of an idle worker: enqueue one job, wait for its timestamp, repeat."""
        self.flush()
        worker = self.start_worker(system, 10, "stamp", "latency")
        producer = system.producer(self.url)
        try:
            deadline = time.monotonic() + 60
            warm, resend, sent = 0, 0.0, 0
            while warm < 3:  # warm-up: the first stamp also tells that the worker is up
                if time.monotonic() >= resend:
                    # re-sent every 10 s: a job sent while an RQ worker-pool starts was sometimes never run
                    producer.one("stamp")
                    resend, sent = time.monotonic() + 10, sent + 1
                if self.r.blpop(["bench:stamps"], timeout=0.5):
                    warm, resend = warm + 1, 0.0
                worker.check()
                if time.monotonic() > deadline:
                    raise TimeoutError("worker did not pick up a job within 60s")
            time.sleep(1.0)  # a re-sent warm-up job must not land among the samples
            self.r.delete("bench:stamps")
            values = []
            for _ in range(samples):
                t0 = producer.one("stamp")
                got = self.r.blpop(["bench:stamps"], timeout=10)
                if not got:
                    raise TimeoutError("a stamp job did not run within 10s")
                values.append((float(got[1]) - t0) * 1000)
                time.sleep(random.uniform(0.005, 0.025))  # no fixed period to alias with a poll loop
        finally:
            producer.close()
            worker.stop()
        return {"p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values),
                "max": max(values), "warmup_sent": sent}

    def run_system(self, system: Any, runs: int) -> dict[str, Any]:
        c = self.counts
        out: dict[str, Any] = {"label": system.label, "family": system.family, "engine": system.engine,
                               "bulk_api": system.bulk_api, "notes": system.notes, "errors": {}}

        def step(name: str, fn: Any) -> None:
            log(f"{system.key}: {name}")
            try:
                out[name] = fn()
            except NotImplementedError:
                out[name] = None
            except Exception as exc:  # noqa: BLE001 - one failing step must not stop the bench
                out[name] = None
                out["errors"][name] = f"{type(exc).__name__}: {exc}"[:400]
                log(f"{system.key}: {name} failed: {exc}")
                traceback.print_exc(limit=3)

        step("enqueue_single", lambda: self.enqueue(system, "noop", self.jobs(system, c["single"]), bulk=False))
        if system.bulk_api:
            step("enqueue_bulk", lambda: self.enqueue(system, "noop", c["bulk"], bulk=True))

        def drains() -> list[dict[str, float]]:
            results = []
            for i in range(runs):
                results.append(self.drain(system, "noop", self.jobs(system, c["drain"]), 10, f"drain{i}"))
                log(f"{system.key}: drain run {i + 1}: {results[-1]['jobs_s']:,.0f} jobs/s")
                if results[-1]["seconds"] > ONE_RUN_IF_SLOWER_S:
                    break
            return results

        step("drain", drains)
        step("sleep50", lambda: self.drain(system, "sleep", self.jobs(system, c["sleep"]), 50, "sleep50"))
        samples = c["latency"] // 5 if system.key == "arq-raw" else self.jobs(system, c["latency"])
        step("latency", lambda: self.latency(system, samples))
        if out.get("drain"):
            out["drain_jobs_s"] = median([d["jobs_s"] for d in out["drain"]])
            out["rss_mb"] = median([d["rss_mb"] for d in out["drain"]])
        return out


def ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}"


def render(meta: dict[str, Any], results: dict[str, dict[str, Any]], extra: list[str]) -> str:
    m = meta["machine"]
    v = m["versions"]
    lines = [
        "# Benchmark results", "",
        f"- date: {meta['date']}, mode: {meta['mode']} (`python bench/run.py{' --quick' if meta['mode'] == 'quick' else ''}`), "
        f"wall time {meta['wall_s'] / 60:.1f} min",
        f"- machine: {m['nproc']} CPUs, {m['cpu']}, {m['memory']} RAM, Linux {m['kernel']}",
        f"- layer code: commit {m['code']}",
        f"- Python {m['python']}, redis-server {m['redis_server']} (private, free port, no persistence)",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- counts: drain {meta['counts']['drain']} no-op jobs (median of up to {meta['counts']['runs']} runs; "
        f"RQ: {max(100, meta['counts']['drain'] // SLOW_DIVISOR)}), "
        f"enqueue {meta['counts']['single']} single / {meta['counts']['bulk']} bulk, "
        f"{meta['counts']['sleep']} x 10 ms sleep at concurrency 50, {meta['counts']['latency']} latency samples "
        f"(arq defaults: {meta['counts']['latency'] // 5})",
        "- one worker process, concurrency 10 (50 for the sleep column); the bench, Redis and the worker share the CPUs; "
        f"load average (1 min) {meta['loadavg']['before'][0]:.2f} before, {meta['loadavg']['after'][0]:.2f} after "
        "(other work on the machine shows up here)",
        "",
        "| system | enqueue single jobs/s | enqueue bulk jobs/s | drain no-op jobs/s | drain runs | 10 ms sleep @50 jobs/s | idle pickup p50 / p99 ms | worker RSS MB |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in results.values():
        runs = ", ".join(f"{d['jobs_s']:,.0f}" for d in (r.get("drain") or [])) or "—"
        lat = r.get("latency") or {}
        sleep = (r.get("sleep50") or {}).get("jobs_s")
        lines.append(
            f"| {r['label']} | {fmt(r.get('enqueue_single'))} | {fmt(r.get('enqueue_bulk'))} | "
            f"{fmt(r.get('drain_jobs_s'))} | {runs} | {fmt(sleep)} | "
            f"{fmt(lat.get('p50'), 1)} / {fmt(lat.get('p99'), 1)} | {fmt(r.get('rss_mb'), 0)} |")
    lines += ["", "Bulk: " + "; ".join(f"{r['label']}: {r['bulk_api']}" for r in results.values() if r["bulk_api"])
              + ". Dramatiq and Celery have no bulk path (only a loop of send/delay).", ""]
    lines += ["## Layer / raw engine", "",
              "| engine | raw baseline | drain layer/raw | enqueue single layer/raw | bulk (layer) / single (raw) | pickup p99 layer vs raw ms |",
              "|---|---|---:|---:|---:|---|"]
    for engine, raws in (("arq", ("arq-raw", "arq-raw-poll")), ("dramatiq", ("dramatiq-raw",)), ("taskiq", ("taskiq-raw",))):
        layer = results.get(f"layer-{engine}")
        for raw_key in raws:
            raw = results.get(raw_key)
            if not layer or not raw:
                continue
            lat_l, lat_r = (layer.get("latency") or {}).get("p99"), (raw.get("latency") or {}).get("p99")
            lines.append(f"| {engine} | {raw['label']} | {ratio(layer.get('drain_jobs_s'), raw.get('drain_jobs_s'))} | "
                         f"{ratio(layer.get('enqueue_single'), raw.get('enqueue_single'))} | "
                         f"{ratio(layer.get('enqueue_bulk'), raw.get('enqueue_single'))} | "
                         f"{fmt(lat_l, 1)} vs {fmt(lat_r, 1)} |")
    lines += ["", "## Targets", ""] + targets(results) + [""]
    errors = [(r["label"], step, e) for r in results.values() for step, e in r["errors"].items()]
    if errors:
        lines += ["## Steps that failed", ""] + [f"- {label} / {step}: `{e}`" for label, step, e in errors] + [""]
    notes = [f"- {r['label']}: {n}" for r in results.values() for n in r["notes"]]
    notes += [f"- {r['label']}: {r['latency']['warmup_sent']} warm-up jobs sent to get 3 run: a job sent while "
              "the worker was starting was never run (the bench re-sends after 10 s)"
              for r in results.values() if (r.get("latency") or {}).get("warmup_sent", 0) > 3]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    return "\n".join(lines + extra) + "\n"


def targets(results: dict[str, dict[str, Any]]) -> list[str]:
    out = ["| target | measured | met |", "|---|---|---|"]
    pairs = {"arq": "arq-raw-poll", "dramatiq": "dramatiq-raw", "taskiq": "taskiq-raw"}
    for engine, raw_key in pairs.items():
        layer, raw = results.get(f"layer-{engine}", {}), results.get(raw_key, {})
        a, b = layer.get("drain_jobs_s"), raw.get("drain_jobs_s")
        if a and b:
            out.append(f"| layer keeps >= 90% of raw drain ({engine}, vs {raw['label']}) | {a / b:.0%} | "
                       f"{'yes' if a / b >= 0.9 else 'no'} |")
    for column, name in (("drain", "drain"), ("sleep50", "10 ms sleep @50")):
        def figure(r: dict[str, Any], column: str = column) -> float:
            return (r.get("drain_jobs_s") if column == "drain" else (r.get("sleep50") or {}).get("jobs_s")) or 0

        layers = {k: figure(r) for k, r in results.items() if r["family"] == "layer"}
        peers = {r["label"]: figure(r) for r in results.values() if r["family"] == "peer"}
        if layers and peers:
            best_key = max(layers, key=layers.__getitem__)
            best_peer = max(peers, key=peers.__getitem__)
            if peers[best_peer] and layers[best_key]:
                gain = layers[best_key] / peers[best_peer] - 1
                out.append(f"| fastest layer engine beats every peer by >= 25% ({name}) | {results[best_key]['label']} "
                           f"{layers[best_key]:,.0f} vs {best_peer} {peers[best_peer]:,.0f}: {gain:+.0%} | "
                           f"{'yes' if gain >= 0.25 else 'no'} |")
    bulk = {r["label"]: r.get("enqueue_bulk") for r in results.values() if r["family"] == "layer"}
    for label, value in bulk.items():
        if value:
            out.append(f"| bulk enqueue >= 50,000 jobs/s ({label}) | {value:,.0f} | {'yes' if value >= 50000 else 'no'} |")
    for r in results.values():
        p99 = (r.get("latency") or {}).get("p99")
        if r["family"] == "layer" and p99 is not None:
            out.append(f"| idle pickup p99 < 10 ms ({r['label']}) | {p99:.1f} ms | {'yes' if p99 < 10 else 'no'} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts, one drain run (~2-3 min)")
    parser.add_argument("--only", help="comma-separated system keys (see --list)")
    parser.add_argument("--list", action="store_true", help="list the systems and exit")
    parser.add_argument("--runs", type=int, help="drain runs per system (median is reported)")
    for name in ("drain", "single", "bulk", "sleep", "latency"):
        parser.add_argument(f"--{name}", type=int, help=f"override the {name} count")
    parser.add_argument("--no-roundtrips", action="store_true", help="skip the Redis round-trip count")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation (layer parts stubbed out)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of the layer")
    parser.add_argument("--no-idle", action="store_true", help="skip bench/idle.py (idle commands/s, pickup)")
    parser.add_argument("--redis-server", help="redis-server binary (default: the newest on PATH)")
    parser.add_argument("--worktree", action="store_true",
                        help="measure app/ with its uncommitted changes (default: app/ as committed at HEAD)")
    parser.add_argument("--in-place", action="store_true",
                        help="run the checkout's code directly instead of a snapshot of it")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    args = parser.parse_args()
    if not os.environ.get("BENCH_HOME") and not args.in_place and not args.list:
        # Others may edit app/ during the run: measure a frozen copy, write results here.
        code, state = snapshot(args.worktree)
        env = {**os.environ, "BENCH_HOME": str(ROOT), "BENCH_CODE": state}
        os.execve(sys.executable, [sys.executable, str(code / "bench" / "run.py"), *sys.argv[1:]], env)
    try:
        body(args)
    finally:
        if HOME != ROOT and ROOT.name.startswith("bench-code-"):
            shutil.rmtree(ROOT, ignore_errors=True)


def body(args: argparse.Namespace) -> None:
    counts = dict(QUICK if args.quick else FULL)
    for name in ("runs", "drain", "single", "bulk", "sleep", "latency"):
        if getattr(args, name) is not None:
            counts[name] = getattr(args, name)

    started = time.time()
    load_before = os.getloadavg()
    binary = pick_redis_server(args.redis_server)
    server = start_redis(binary)
    os.environ["BENCH_REDIS_URL"] = server.url  # system modules read it at import
    try:
        from bench.systems import all_systems

        systems = all_systems()
        if args.list:
            for s in systems:
                print(f"{s.key:14} {s.label}")
            return
        if args.only:
            wanted = set(args.only.split(","))
            systems = [s for s in systems if s.key in wanted]
        log(f"redis at {server.url}; {len(systems)} systems; counts {counts}")
        bench = Bench(server.url, counts, args.out / "logs")
        results = {s.key: bench.run_system(s, counts["runs"]) for s in systems}
        extra: list[str] = []
        full_set = not args.only
        if not args.no_roundtrips and (full_set or any(s.family == "layer" for s in systems)) and not args.quick:
            from bench import roundtrips

            log("round trips per job")
            extra += roundtrips.section(server.url, counts["rt_jobs"], args.out / "logs")
        if not args.no_ablation and not args.quick and (full_set or any(s.family == "layer" for s in systems)):
            from bench import ablate

            log("ablation: the layer with one part stubbed out")
            raw = {e: results.get(k, {}).get("drain_jobs_s") for e, k in
                   (("arq", "arq-raw-poll"), ("dramatiq", "dramatiq-raw"), ("taskiq", "taskiq-raw"))}
            extra += ablate.section(server.url, counts["drain"], args.out / "logs", raw=raw)
        if not args.no_profile and not args.quick and (full_set or any(s.family == "layer" for s in systems)):
            from bench import profile

            log("py-spy profile of one layer drain per engine")
            extra += profile.section(server.url, counts["profile_jobs"], args.out)
        if not args.no_idle and not args.quick and full_set:
            from bench import idle

            log("idle worker: Redis commands per second, pickup")
            redis.Redis.from_url(server.url).flushall()
            extra += idle.section(server.url)
    finally:
        server.cleanup()
    meta = {"date": date.today().isoformat(), "mode": "quick" if args.quick else "full", "counts": counts,
            "machine": machine(binary), "wall_s": time.time() - started,
            "loadavg": {"before": load_before, "after": os.getloadavg()}}
    text = render(meta, results, extra)
    write_json(args.out / "latest.json", {"meta": meta, "results": results})
    (args.out / "latest.md").write_text(text)
    if not args.quick and not args.only:
        (HOME / "bench" / "RESULTS.md").write_text(text)
    print(text)
    log(f"done in {(time.time() - started) / 60:.1f} min: {args.out / 'latest.md'}")


if __name__ == "__main__":
    main()
