"""Scaling across worker processes, and what one job costs Redis, per engine, layer and raw.

    python bench/scale.py                      # 1, 2, 4, 8 processes x 3 engines x (raw, layer), ~5 min on 2 cores
    python bench/scale.py --procs 1,2 --engines taskiq --jobs 3000

For each engine, raw and through the layer, with 1, 2, 4 and 8 worker processes (concurrency 10
each) against one private redis-server: the workers are started on an empty queue and left to
settle (each process idle), then frozen (SIGSTOP) while the bench enqueues N no-op jobs, then
released together (SIGCONT), so the drain is timed with every process up instead of with the
first ones draining while the others still import. Around the enqueue and the drain the bench
reads ``INFO commandstats`` (calls, including those run inside Lua scripts and MULTI blocks)
and ``INFO cpu`` (``used_cpu_sys + used_cpu_user`` of the server), and the workers' CPU time;
after the drain a 2 s idle window gives the background rate (heartbeats, polls), which is taken
off the drain's figures. Per job: Redis commands and Redis CPU µs (enqueue + drain), from which
one Redis core's ceiling is ``1e6 / µs per job`` jobs/s; worker CPU µs per job.

Timing and counting are the same for every system: the task body is ``bench.probe``'s no-op in
``shared`` mode (counted in memory, published per process every 50 ms with PSETEX, a command
left out of the figures, like the bench's own INFO and MGET). Layer: ``app worker bench
--processes N --threads 10`` (the supervisor and N children), events, heartbeats, results and
crash recovery on; the jobs through ``WorkerClient.enqueue_many``. Raw: N separate processes of
``bench/systems/*_raw.py`` (arq at ``poll_delay=0.01``), enqueued by each library's own client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis

from bench.common import (
    HOME,
    RESULTS,
    ROOT,
    WorkerProc,
    fmt,
    log,
    machine,
    pick_redis_server,
    snapshot,
    start_redis,
    worker_env,
    write_json,
)

BENCH_COMMANDS = {"info", "mget", "psetex", "flushall", "client|setinfo", "hello", "ping"}
IDLE_S = 2.0
SETTLE_CPU = 0.2  # a process using less than this share of a core is idle (done starting)


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used (all CPUs), from /proc/stat."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def server(r: redis.Redis) -> tuple[float, dict[str, int], float]:
    """(monotonic time, commands by name, Redis CPU seconds)."""
    stats = r.info("commandstats")
    cpu = r.info("cpu")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
             if k.removeprefix("cmdstat_") not in BENCH_COMMANDS}
    return time.monotonic(), calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


class Workers:
    """N worker processes of one system (one supervisor for the layer, N processes raw)."""

    def __init__(self, system: Any, url: str, procs: int, concurrency: int, n: int, logs: Path) -> None:
        task = "probe_noop" if system.family == "layer" else "noop"
        env = worker_env(url, {"BENCH_TARGET": str(n), "BENCH_COUNT": "shared",
                               **system.worker_env(url, concurrency, task)})
        argv = system.worker_argv(url, concurrency, task)
        name = f"scale-{system.key}-p{procs}"
        if system.family == "layer":
            self.roots = [WorkerProc([*argv, "--processes", str(procs)], env, logs / f"{name}.log")]
        else:
            self.roots = [WorkerProc(argv, env, logs / f"{name}-{i}.log") for i in range(procs)]
        self.procs = procs

    def pids(self) -> list[int]:
        return [p for w in self.roots for p in (w.pid, *w.descendants())]

    def check(self) -> None:
        for w in self.roots:
            w.check()

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def signal(self, signum: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        for w in self.roots:
            w.stop()


def records(r: redis.Redis, pids: list[int]) -> list[dict[str, Any]]:
    values = r.mget([f"bench:p:{p}" for p in pids]) if pids else []
    return [json.loads(v) for v in values if v]


def settle(r: redis.Redis, workers: Workers, timeout: float = 120.0) -> float:
    """Wait until N processes have loaded the probe and every process is idle; returns seconds."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        workers.check()
        pids = workers.pids()
        if len(records(r, pids)) >= workers.procs:
            before = {}
            for pid in pids:
                try:
                    t = psutil.Process(pid).cpu_times()
                    before[pid] = t.user + t.system
                except psutil.Error:
                    pass
            time.sleep(0.5)
            busy = False
            for pid, cpu in before.items():
                try:
                    t = psutil.Process(pid).cpu_times()
                    busy |= (t.user + t.system - cpu) / 0.5 > SETTLE_CPU
                except psutil.Error:
                    pass
            if not busy and set(workers.pids()) == set(pids):
                time.sleep(0.5)  # the engine's first blocking read / poll is out
                return time.monotonic() - t0
        else:
            time.sleep(0.2)
    raise TimeoutError(f"{workers.procs} worker processes not up and idle within {timeout:g}s")


def wait_done(r: redis.Redis, workers: Workers, n: int, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers.check()
        got = [x for x in records(r, workers.pids()) if x["n"]]
        if sum(x["n"] for x in got) >= n:
            return {"first": min(x["first"] for x in got), "last": max(x["last"] for x in got),
                    "n": sum(x["n"] for x in got), "busy_procs": len(got)}
        time.sleep(0.1)
    raise TimeoutError(f"{n} jobs not drained within {timeout:g}s")


def diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) != a.get(k, 0)}


def measure(system: Any, url: str, procs: int, n: int, concurrency: int, logs: Path) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    r.flushall()
    task = "probe_noop" if system.family == "layer" else "noop"
    load = os.getloadavg()[0]
    workers = Workers(system, url, procs, concurrency, n, logs)
    try:
        settle_s = settle(r, workers)
        workers.signal(signal.SIGSTOP)
        t0, c0, cpu0 = server(r)
        producer = system.producer(url)
        try:
            producer.bulk(task, n) if system.bulk_api else producer.single(task, n)
        finally:
            producer.close()
        t1, c1, cpu1 = server(r)
        w1, m1, b1 = workers.cpu_s(), machine_busy_s(), own_cpu_s()
        workers.signal(signal.SIGCONT)
        done = wait_done(r, workers, n, 60 + n / 100)
        t2, c2, cpu2 = server(r)
        w2, m2, b2 = workers.cpu_s(), machine_busy_s(), own_cpu_s()
        time.sleep(IDLE_S)
        t3, c3, cpu3 = server(r)
        w3 = workers.cpu_s()
    finally:
        workers.stop()
    window = t2 - t1
    idle_cmds = sum(diff(c2, c3).values()) / (t3 - t2)
    idle_cpu = (cpu3 - cpu2) / (t3 - t2)
    idle_wcpu = (w3 - w2) / (t3 - t2)
    enq_cmds, drain_cmds = sum(diff(c0, c1).values()), sum(diff(c1, c2).values()) - idle_cmds * window
    enq_us, drain_us = (cpu1 - cpu0) * 1e6 / n, ((cpu2 - cpu1) - idle_cpu * window) * 1e6 / n
    span = max(done["last"] - done["first"], 1e-6)
    by_command = {k: round(v / n, 3) for k, v in sorted(diff(c0, c2).items(), key=lambda kv: -kv[1]) if v / n >= 0.01}
    return {
        "system": system.key, "label": system.label, "family": system.family, "engine": system.engine,
        "procs": procs, "n": n, "jobs_s": n / span, "seconds": span, "busy_procs": done["busy_procs"],
        "enqueue_cmds": enq_cmds / n, "drain_cmds": drain_cmds / n, "cmds": (enq_cmds + drain_cmds) / n,
        "enqueue_us": enq_us, "drain_us": drain_us, "redis_us": enq_us + drain_us,
        # CPU used while draining, in cores: the window also holds up to ~0.15 s of wait after the last job
        "redis_cores": (cpu2 - cpu1) / window, "worker_us": ((w2 - w1) - idle_wcpu * window) * 1e6 / n,
        "worker_cores": (w2 - w1) / window, "window_s": window,
        # what else ran meanwhile (other work on the machine): all CPU time less Redis, workers, the bench
        "other_cores": max(0.0, (m2 - m1) - (cpu2 - cpu1) - (w2 - w1) - (b2 - b1)) / window, "idle_cmds_s": idle_cmds, "by_command": by_command,
        "settle_s": settle_s, "load_before": load, "load_after": os.getloadavg()[0],
    }


def systems_for(engines: list[str], raw: bool) -> list[Any]:
    from bench.systems import arq_raw, dramatiq_raw, layer, taskiq_raw

    raws = {"arq": arq_raw.ArqRaw(poll_delay=0.01), "dramatiq": dramatiq_raw.DramatiqRaw(),
            "taskiq": taskiq_raw.TaskiqRaw()}
    out = []
    for engine in engines:
        if raw:
            out.append(raws[engine])
        out.append(layer.Layer(engine))
    return out


def bound(row: dict[str, Any], cpus: int) -> float | None:
    """Jobs/s if all CPUs did only the drain's work (worker + Redis), at the measured cost per job."""
    us = row["worker_us"] + row["drain_us"]
    return cpus * 1e6 / us if us > 0 else None


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    m = meta["machine"]
    v = m["versions"]
    lines = [
        "# Scaling across worker processes, and Redis cost per job", "",
        f"- date: {meta['date']} (`python bench/scale.py{meta['argv']}`), wall time {meta['wall_s'] / 60:.1f} min",
        f"- machine: {m['nproc']} CPUs, {m['cpu']}, {m['memory']} RAM, Linux {m['kernel']}; the bench, Redis and "
        "every worker process share these CPUs",
        f"- layer code: commit {m['code']}",
        f"- Python {m['python']}, redis-server {m['redis_server']} (private, free port, no persistence); "
        + ", ".join(f"{k} {v[k]}" for k in ("arq", "dramatiq", "taskiq", "taskiq-redis", "redis", "hiredis")),
        f"- {meta['jobs']} no-op jobs per run, concurrency {meta['concurrency']} per process, "
        f"{'one run per row' if meta.get('runs', 1) == 1 else str(meta['runs']) + ' runs per row, the median (of two: the faster)'}; "
        f"load average (1 min) {meta['loadavg']['before'][0]:.2f} before, {meta['loadavg']['after'][0]:.2f} after",
        "",
        "Per job: Redis commands and Redis CPU are enqueue + drain (the enqueue's share in brackets); "
        "the ceiling is what one Redis core carries at that cost, `1e6 / Redis µs per job`; Redis cores and "
        "worker cores are the CPU each used during the drain (2 = both of this machine's CPUs). The CPU bound is "
        "what this machine's CPUs would drain if they did nothing but this: `CPUs x 1e6 / (worker µs + Redis drain µs)`. Other work: CPU that other processes on the "
        "machine used during the drain (all CPU time less Redis, the workers and the bench), in cores; the load average "
        "also counts this bench's own processes.",
        "",
        "| system | processes | drain jobs/s | vs 1 process | Redis commands per job (enqueue) | Redis CPU µs per job (enqueue) "
        "| one Redis core's ceiling, jobs/s | Redis cores | worker CPU µs per job | worker cores "
        "| CPU bound of this machine, jobs/s | other work, cores | load 1 min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["system"]: r["jobs_s"] for r in rows if r["procs"] == 1}
    for r in rows:
        first = base.get(r["system"])
        lines.append(
            f"| {r['label']} | {r['procs']} | {fmt(r['jobs_s'])} | {fmt(r['jobs_s'] / first, 2) if first else '—'} | "
            f"{fmt(r['cmds'], 1)} ({fmt(r['enqueue_cmds'], 1)}) | {fmt(r['redis_us'])} ({fmt(r['enqueue_us'])}) | "
            f"{fmt(1e6 / r['redis_us']) if r['redis_us'] > 0 else '—'} | {fmt(r['redis_cores'], 2)} | "
            f"{fmt(r['worker_us'])} | {fmt(r['worker_cores'], 2)} | {fmt(bound(r, meta['machine']['nproc']))} | "
            f"{fmt(r.get('other_cores'), 2)} | {r['load_before']:.1f} |")
    lines += ["", "## Layer / raw, side by side", "",
              "| engine | processes | drain layer / raw | Redis commands per job, raw / layer | Redis CPU µs per job, raw / layer "
              "| one Redis core's ceiling jobs/s, raw / layer |", "|---|---:|---:|---|---|---|"]
    by = {(r["family"], r["engine"], r["procs"]): r for r in rows}
    for engine in meta["engines"]:
        for procs in meta["procs"]:
            raw, lay = by.get(("raw", engine, procs)), by.get(("layer", engine, procs))
            if not raw or not lay:
                continue
            lines.append(
                f"| {engine} | {procs} | {lay['jobs_s'] / raw['jobs_s']:.2f} | {raw['cmds']:.1f} / {lay['cmds']:.1f} | "
                f"{raw['redis_us']:.0f} / {lay['redis_us']:.0f} | {1e6 / raw['redis_us']:,.0f} / {1e6 / lay['redis_us']:,.0f} |")
    lines += ["", "## Commands per job by name (enqueue + drain, before the idle correction)", ""]
    for r in rows:
        if r["procs"] == meta["procs"][0]:
            lines.append(f"- {r['label']}: " + ", ".join(f"{k} {v:g}" for k, v in r["by_command"].items()))
    failed = meta.get("failed") or []
    if failed:
        lines += ["", "## Runs that failed", ""] + [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2,4,8", help="worker process counts")
    parser.add_argument("--engines", default="arq,dramatiq,taskiq")
    parser.add_argument("--jobs", type=int, default=10000, help="no-op jobs per run")
    parser.add_argument("--concurrency", type=int, default=10, help="slots per worker process")
    parser.add_argument("--runs", type=int, default=1, help="runs per row; the row is the median run (of two: the faster)")
    parser.add_argument("--no-raw", action="store_true", help="the layer only")
    parser.add_argument("--redis-server", help="redis-server binary (default: the newest on PATH)")
    parser.add_argument("--worktree", action="store_true", help="measure app/ with its uncommitted changes")
    parser.add_argument("--in-place", action="store_true", help="run the checkout's code, not a snapshot")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    args = parser.parse_args()
    if not os.environ.get("BENCH_HOME") and not args.in_place:
        code, state = snapshot(args.worktree)
        env = {**os.environ, "BENCH_HOME": str(HOME), "BENCH_CODE": state}
        os.execve(sys.executable, [sys.executable, str(code / "bench" / "scale.py"), *sys.argv[1:]], env)
    try:
        body(args)
    finally:
        if HOME != ROOT and ROOT.name.startswith("bench-code-"):
            shutil.rmtree(ROOT, ignore_errors=True)


def body(args: argparse.Namespace) -> None:
    started = time.time()
    procs = [int(x) for x in args.procs.split(",")]
    engines = args.engines.split(",")
    load_before = os.getloadavg()
    binary = pick_redis_server(args.redis_server)
    srv = start_redis(binary)
    os.environ["BENCH_REDIS_URL"] = srv.url  # system modules read it at import
    rows, failed = [], []
    try:
        systems = systems_for(engines, raw=not args.no_raw)
        log(f"redis at {srv.url}; {len(systems)} systems x {procs} processes, {args.jobs} jobs each")
        for p in procs:
            for system in systems:
                runs = []
                for _ in range(args.runs):
                    try:
                        runs.append(measure(system, srv.url, p, args.jobs, args.concurrency, args.out / "logs"))
                    except Exception as exc:  # noqa: BLE001 - one failing run must not stop the bench
                        failed.append(f"{system.label}, {p} processes: {type(exc).__name__}: {exc}"[:400])
                        log(f"{system.key} x{p} failed: {exc}")
                if not runs:
                    continue
                runs.sort(key=lambda x: x["jobs_s"])
                row = {**runs[len(runs) // 2], "runs": [x["jobs_s"] for x in runs]}  # the median (of two: the faster)
                rows.append(row)
                log(f"{system.key} x{p}: {row['jobs_s']:,.0f} jobs/s, {row['cmds']:.1f} cmds/job, "
                    f"Redis {row['redis_us']:.0f} µs/job ({row['redis_cores']:.2f} cores), "
                    f"worker {row['worker_us']:.0f} µs/job ({row['worker_cores']:.2f} cores), load {row['load_before']:.1f}")
    finally:
        srv.cleanup()
    argv = "" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:])
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "argv": argv, "jobs": args.jobs,
            "concurrency": args.concurrency, "runs": args.runs, "procs": procs, "engines": engines, "machine": machine(binary),
            "wall_s": time.time() - started, "failed": failed,
            "loadavg": {"before": load_before, "after": os.getloadavg()}}
    text = render(meta, rows)
    write_json(args.out / "scale.json", {"meta": meta, "rows": rows})
    (args.out / "scale.md").write_text(text)
    if argv == "" or args.procs == "1,2,4,8" and args.engines == "arq,dramatiq,taskiq" and not args.no_raw:
        (HOME / "bench" / "SCALE.md").write_text(text)
    print(text)
    log(f"done in {(time.time() - started) / 60:.1f} min: {args.out / 'scale.md'}")


if __name__ == "__main__":
    main()
