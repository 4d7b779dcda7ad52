"""Where a layer worker's CPU goes while it drains no-op jobs, per engine (py-spy).

    python bench/profile.py [--jobs 20000] [--only arq,taskiq]

N no-op jobs are enqueued, ``app worker load_test --backend E --threads 10`` is started, and
py-spy (``record --nonblocking``, raw collapsed stacks) is attached as soon as the worker
announces itself, until the last job's terminal event. Writes
``bench/results/profile-E.txt`` (raw stacks: feed them to flamegraph.pl or speedscope) and
a summary: CPU share by component (the leaf frame's package) and the heaviest functions.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.common import RESULTS, WorkerProc, log, pick_redis_server, start_redis, wait_events_done, worker_env

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# leaf-frame file -> component, first match wins
COMPONENTS = [
    ("selectors.py", "I/O wait (epoll select)"),
    ("app/components/worker/runtime/", "layer: runtime (wrapper, store, policy)"),
    ("app/components/worker/events", "layer: events"),
    ("app/components/worker/middleware", "layer: middleware chain"),
    ("app/components/worker/engines/", "layer: engine adapter"),
    ("app/components/worker/envelope", "layer: envelope"),
    ("app/components/worker/health", "layer: heartbeat"),
    ("app/", "layer: other"),
    ("redis/", "redis-py"), ("hiredis", "redis-py"),
    ("arq/", "arq"), ("dramatiq/", "dramatiq"), ("taskiq_redis/", "taskiq"), ("taskiq/", "taskiq"),
    ("asyncio/", "asyncio event loop"),
    ("json/", "json"), ("logging/", "logging"), ("inspect.py", "inspect (signature binding)"),
    ("threading.py", "thread wait (threading)"), ("concurrent/", "threads / futures"), ("queue.py", "threads / futures"),
    ("uuid.py", "uuid"), ("typing.py", "typing"), ("pydantic", "pydantic"),
]
WAITS = ("I/O wait (epoll select)", "thread wait (threading)")
HOT = ("app/components/worker/", "arq/", "dramatiq/", "taskiq", "json/", "inspect.py", "logging/")


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            m = FRAME.match(raw.strip())
            frames.append((m["func"], m["file"]) if m else (raw.strip(), ""))
        stacks.append((frames, int(count)))
    return stacks


def component(file: str) -> str:
    return next((name for needle, name in COMPONENTS if needle in file), "other stdlib / C")


def summarise(stacks: list[tuple[list[tuple[str, str]], int]]) -> dict[str, Any]:
    total = sum(c for _, c in stacks) or 1
    by_component: collections.Counter[str] = collections.Counter()
    self_fn: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        if any("_find_and_load" in f for f, _ in frames):  # start-up imports are not the drain
            continue
        func, file = frames[-1]
        by_component[component(file)] += count
        self_fn[f"{func} ({file})"] += count
        loop = next((i for i, (f, _) in enumerate(frames) if f.endswith(("run_forever", "_run_once"))), -1)
        for name in {f"{f} ({fl})" for f, fl in frames[loop + 1:]}:  # what the event loop runs, not its callers
            inclusive[name] += count
    waited = sum(by_component.get(w, 0) for w in WAITS)
    busy = max(total - waited, 1)

    def pct(count: int) -> float:
        return round(100 * count / busy, 1)

    waiting = {f"{f} ({fl})" for f, fl in (("EpollSelector.select", "selectors.py"),)}
    return {
        "samples": total,
        "waits_pct": {w: round(100 * by_component.get(w, 0) / total, 1) for w in WAITS},
        "components": [(k, pct(v)) for k, v in by_component.most_common() if k not in WAITS],
        "self": [(k, pct(v)) for k, v in self_fn.most_common(40)
                 if k not in waiting and "(threading.py)" not in k][:15],
        "inclusive": [(k, pct(v)) for k, v in inclusive.most_common() if any(h in k for h in HOT) and v < 0.9 * busy][:30],
    }


def profile_engine(engine: str, url: str, n: int, out_dir: Path) -> dict[str, Any]:
    from bench.systems.layer import Layer

    system = Layer(engine)
    r = redis.Redis.from_url(url)
    r.flushall()
    producer = system.producer(url)
    producer.bulk("noop", n)
    producer.close()
    out = out_dir / f"profile-{engine}.txt"
    worker = WorkerProc(system.worker_argv(url, 10, "noop"), worker_env(url, system.worker_env(url, 10, "noop")),
                        out_dir / "logs" / f"profile-{engine}-worker.log")
    spy = None
    try:
        deadline = time.monotonic() + 60
        while True:  # the worker announces itself with worker.started, after the last job.enqueued
            worker.check()
            last = r.xrevrange("worker:events", count=1)
            if last and last[0][1].get(b"type") != b"job.enqueued":
                break
            if time.monotonic() > deadline:
                raise TimeoutError("worker did not start within 60s")
            time.sleep(0.01)
        spy = subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "--pid", str(worker.pid), "--rate", "250",
                                "--nonblocking", "--format", "raw", "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        done = wait_events_done(r, worker, n, 60 + n / 50)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
        worker.stop()
    if not out.exists():
        raise RuntimeError(f"py-spy wrote nothing: {spy.stderr.read() if spy and spy.stderr else ''}")
    summary = summarise(parse(out))
    summary["jobs_s_under_profiler"] = round(n / max(done["last"] - done["first"], 1e-6))
    return summary


def render(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Where a layer worker's CPU goes (py-spy, no-op drain)", "",
             "py-spy `record --nonblocking --rate 250` (threads py-spy sees as active). Samples waiting in epoll or "
             "on a thread lock are counted apart; the rest (busy samples) are split by the package of the innermost "
             "frame. Raw stacks: `bench/results/profile-<engine>.txt` (flamegraph.pl or speedscope).", ""]
    comps: list[str] = []
    for res in results.values():
        comps += [c for c, _ in res["components"] if c not in comps]
    lines.append("| component | " + " | ".join(results) + " |")
    lines.append("|---|" + "---:|" * len(results))
    for comp in comps:
        cells = [f"{dict(res['components']).get(comp, 0):.1f}%" for res in results.values()]
        lines.append(f"| {comp} | " + " | ".join(cells) + " |")
    for wait in WAITS:
        lines.append(f"| *{wait}, share of all samples* | "
                     + " | ".join(f"*{res['waits_pct'][wait]:.1f}%*" for res in results.values()) + " |")
    lines.append("| samples (jobs/s under the profiler) | "
                 + " | ".join(f"{res['samples']} ({res['jobs_s_under_profiler']:,})" for res in results.values()) + " |")
    for engine, res in results.items():
        lines += ["", f"**{engine}**: heaviest functions, self time (% of busy samples): "
                  + "; ".join(f"`{k}` {v}%" for k, v in res["self"][:10]),
                  "", f"**{engine}**: inclusive time of hot-path functions (% of busy samples): "
                  + "; ".join(f"`{k}` {v}%" for k, v in res["inclusive"][:22])]
    return lines + [""]


def section(url: str, n: int, out_dir: Path, engines: tuple[str, ...] = ("arq", "dramatiq", "taskiq")) -> list[str]:
    results = {}
    for engine in engines:
        log(f"profile: layer on {engine}, {n} jobs")
        try:
            results[engine] = profile_engine(engine, url, n, out_dir)
        except Exception as exc:  # noqa: BLE001
            log(f"profile: {engine} failed: {exc}")
    return render(results) if results else ["## Profile", "", "(py-spy failed: see the log)", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--only", help="comma-separated engines")
    parser.add_argument("--redis-server", help="redis-server binary (default: the newest on PATH)")
    args = parser.parse_args()
    server = start_redis(pick_redis_server(args.redis_server))
    os.environ["BENCH_REDIS_URL"] = server.url
    try:
        engines = tuple(args.only.split(",")) if args.only else ("arq", "dramatiq", "taskiq")
        text = section(server.url, args.jobs, RESULTS, engines)
    finally:
        server.cleanup()
    print("\n".join(text))


if __name__ == "__main__":
    main()
