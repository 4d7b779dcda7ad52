"""Redis round trips and server commands per job, through the layer and raw, per engine.

    python bench/roundtrips.py [--jobs 2000]

For each system: a worker runs under ``bench.rtcount`` (every redis-py send counted by the
code that made it); after an idle window (its rate is the background: polls, heartbeats,
which is subtracted), N no-op jobs are bulk-enqueued and drained. Client figures are round
trips per job; server figures are ``INFO commandstats`` deltas per job, which also count the
commands run inside Lua scripts and MULTI blocks (the bench's own INFO/XREAD/BLPOP excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench import rtcount
from bench.common import (
    RESULTS,
    WorkerProc,
    log,
    pick_redis_server,
    start_redis,
    wait_events_done,
    wait_probe_done,
    worker_env,
)

IDLE_S = 3.0
BENCH_COMMANDS = {"info", "xread", "blpop", "flushall", "keys", "config|resetstat", "client|setinfo", "hello"}
WORKER_PHASES = [
    ("runtime/batch.py", "layer: claim/finish scripts (one pipeline per loop turn)"),
    ("runtime/store.py:claim", "start: claim (Lua)"),
    ("runtime/store.py:finish", "finish: result + status (MULTI)"),
    ("worker/events.py", "events: batched XADD pipeline"),
    ("worker/health.py", "heartbeat"),
    ("runtime/delayed.py", "delayed-job mover poll"), ("runtime/store.py", "delayed-job mover poll"),
    ("runtime/reaper.py", "crash reaper"),
    ("arq/worker.py:_poll_iteration", "pickup: poll (ZRANGEBYSCORE)"),
    ("arq/worker.py:start_jobs", "pickup: claim (WATCH/MULTI in-progress key)"),
    ("arq/worker.py:run_job", "pickup: read job + try count"),
    ("arq/worker.py:finish_job", "engine ack: delete job keys (MULTI)"),
    ("arq/worker.py", "engine: health check / other"),
    ("dramatiq/", "engine fetch + ack (Lua dispatch)"),
    ("listen", "pickup: XREADGROUP"),
    ("taskiq_engine.py:_ack", "engine ack (XACK+XDEL pipeline)"),
    ("taskiq_redis/redis_broker.py:_ack", "engine ack (XACK)"),
    ("bench/probe.py", "bench probe (one RPUSH at the end)"),
]
PRODUCER_PHASES = [
    ("worker/api.py", "enqueue: layer script/pipeline (record, job.enqueued, engine message)"),
    ("worker/health.py", "enqueue: engine check (cached 2 s)"),
    ("", "enqueue: engine send"),
]


def phase_of(tag: str, table: list[tuple[str, str]] = WORKER_PHASES) -> str:
    return next((phase for needle, phase in table if needle in tag), "other: " + tag)


def server_calls(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()
            if k.removeprefix("cmdstat_") not in BENCH_COMMANDS}


def worker_snapshot(worker: WorkerProc, out: Path) -> dict[str, int]:
    before = json.loads(out.read_text())["seq"] if out.exists() else -1
    os.kill(worker.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if out.exists():
            data = json.loads(out.read_text())
            if data["seq"] > before:
                return data["counts"]
        time.sleep(0.02)
    raise TimeoutError("no round-trip snapshot from the worker")


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


def per_job(busy: dict[str, int], idle: dict[str, int], busy_s: float, n: int) -> dict[str, float]:
    out = {}
    for key in set(busy) | set(idle):
        value = (busy.get(key, 0) - idle.get(key, 0) * busy_s / IDLE_S) / n
        if value > 0.0005:
            out[key] = round(value, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def wait_ready(system: Any, url: str, r: redis.Redis, worker: WorkerProc) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        worker.check()
        if system.family == "layer":
            if r.keys("worker:heartbeat:load_test:*"):
                return
        else:
            producer = system.producer(url)
            producer.one("stamp")
            producer.close()
            if r.blpop(["bench:stamps"], timeout=30):
                return
        time.sleep(0.05)
    raise TimeoutError("worker not ready within 60s")


def measure(system: Any, url: str, n: int, logs: Path) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    r.flushall()
    out = logs / f"rt-{system.key}.json"
    out.unlink(missing_ok=True)
    argv = system.worker_argv(url, 10, "noop")
    argv = [argv[0], "-m", "bench.rtcount", str(out), *argv[1:]]
    env = worker_env(url, {"BENCH_TARGET": str(n), "BENCH_COUNT": system.count_mode,
                           **system.worker_env(url, 10, "noop")})
    worker = WorkerProc(argv, env, logs / f"rt-{system.key}.log")
    try:
        wait_ready(system, url, r, worker)
        time.sleep(1.0)
        s_a, c_a = server_calls(r), worker_snapshot(worker, out)
        time.sleep(IDLE_S)
        s_b, c_b, t_b = server_calls(r), worker_snapshot(worker, out), time.monotonic()
        producer = system.producer(url)
        p_before = rtcount.snapshot()["counts"]
        producer.bulk("noop", n) if system.bulk_api else producer.single("noop", n)
        p_bulk = delta(rtcount.snapshot()["counts"], p_before)
        if system.family == "layer":
            wait_events_done(r, worker, n, 120)
        else:
            wait_probe_done(r, worker, 120)
        s_c, c_c, t_c = server_calls(r), worker_snapshot(worker, out), time.monotonic()
        p_before = rtcount.snapshot()["counts"]
        single_n = 200
        producer.single("noop", single_n)
        p_single = delta(rtcount.snapshot()["counts"], p_before)
        producer.close()
    finally:
        worker.stop()
    busy_s = t_c - t_b
    worker_rt = per_job(delta(c_c, c_b), delta(c_b, c_a), busy_s, n)
    server = per_job(delta(s_c, s_b), delta(s_b, s_a), busy_s, n)
    producer_rt = {k: round(v / n, 4) for k, v in p_bulk.items() if v}
    single_rt = {k: round(v / single_n, 4) for k, v in p_single.items() if v}
    return {"label": system.label, "n": n, "worker": worker_rt, "producer_bulk": producer_rt,
            "producer_single": single_rt, "server": server,
            "idle_per_s": {k: round(v / IDLE_S, 1) for k, v in delta(c_b, c_a).items() if v}}


def by_phase(counts: dict[str, float], table: list[tuple[str, str]] = WORKER_PHASES) -> dict[str, float]:
    out: dict[str, float] = {}
    for tag, value in counts.items():
        phase = phase_of(tag, table)
        out[phase] = out.get(phase, 0) + value
    return out


def num(value: float) -> str:
    return f"{value:.3f}" if 0 < value < 0.01 else f"{value:.2f}"


def render(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Redis round trips per job", "",
             "Client round trips (one send: a command, a pipeline, a script call) per no-op job, by phase, "
             "after subtracting the idle background (polls, heartbeats) measured just before. "
             "Server commands per job are `INFO commandstats` deltas, which include the commands run inside "
             "Lua scripts and MULTI blocks.", ""]
    phases: list[str] = []
    rows = {}
    for key, res in results.items():
        merged = by_phase(res["producer_bulk"], PRODUCER_PHASES)
        for p, v in by_phase(res["worker"]).items():
            merged[p] = merged.get(p, 0) + v
        rows[key] = merged
        phases += [p for p in merged if p not in phases]
    lines.append("| phase | " + " | ".join(results[k]["label"] for k in results) + " |")
    lines.append("|---|" + "---:|" * len(results))
    for phase in phases:
        lines.append(f"| {phase} | " + " | ".join(num(rows[k].get(phase, 0)) for k in results) + " |")
    lines.append("| **round trips per job (bulk enqueue + worker)** | "
                 + " | ".join(f"**{sum(rows[k].values()):.2f}**" for k in results) + " |")
    lines.append("| round trips per job, single `enqueue` (producer only) | "
                 + " | ".join(f"{sum(results[k]['producer_single'].values()):.2f}" for k in results) + " |")
    lines.append("| server commands per job (all clients) | "
                 + " | ".join(f"{sum(results[k]['server'].values()):.1f}" for k in results) + " |")
    lines += ["", "Server commands per job, by command:", ""]
    for res in results.values():
        top = ", ".join(f"{cmd} {v:g}" for cmd, v in list(res["server"].items())[:12])
        lines.append(f"- {res['label']}: {top}")
    lines += ["", "Idle background per second (worker client round trips):", ""]
    for res in results.values():
        idle = ", ".join(f"{phase_of(t)} {v:g}" for t, v in sorted(res["idle_per_s"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {res['label']}: {idle or 'none'}")
    return lines + [""]


def section(url: str, n: int, logs: Path, keys: tuple[str, ...] = ()) -> list[str]:
    from bench.systems import all_systems

    rtcount.install()
    wanted = keys or ("arq-raw-poll", "layer-arq", "dramatiq-raw", "layer-dramatiq", "taskiq-raw", "layer-taskiq")
    systems = [s for s in all_systems() if s.key in wanted]
    results = {}
    for system in systems:
        log(f"round trips: {system.key}")
        try:
            results[system.key] = measure(system, url, n, logs)
        except Exception as exc:  # noqa: BLE001
            log(f"round trips: {system.key} failed: {exc}")
    (logs.parent / "roundtrips.json").write_text(json.dumps(results, indent=2))
    return render(results) if results else ["## Redis round trips per job", "", "(measurement failed: see logs)", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--only", help="comma-separated system keys")
    parser.add_argument("--redis-server", help="redis-server binary (default: the newest on PATH)")
    args = parser.parse_args()
    server = start_redis(pick_redis_server(args.redis_server))
    os.environ["BENCH_REDIS_URL"] = server.url
    try:
        text = section(server.url, args.jobs, RESULTS / "logs", tuple(args.only.split(",")) if args.only else ())
    finally:
        server.cleanup()
    print("\n".join(text))


if __name__ == "__main__":
    main()
