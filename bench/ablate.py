"""What each part of the layer's per-job work costs: the same drain with one part stubbed out.

    python bench/ablate.py [--jobs 5000] [--only arq,taskiq]

Bench-only monkeypatches, applied in the worker process by ``python -m bench.ablate worker ...``
before it runs ``app worker``; the layer's code is not changed. Each variant drains the same
no-op jobs, timed in the worker like the raw engines (first job start to last job end, counted
in memory by ``bench.probe``), so the figures compare with the raw rows of RESULTS.md.
A variant that stubs a part out is what that part costs at most; it is not a proposal to drop it.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS: dict[str, tuple[str, ...]] = {
    "as shipped": (),
    "no claim/finish writes": ("store",),
    "no events": ("events",),
    "neither": ("store", "events"),
}
PARTS = {
    "store": "JobStore.claim/finish return at once (no Redis round trip, no job record or result; "
             "the events they carry are dropped too)",
    "events": "EventPublisher.emit does nothing (claim/finish scripts carry no events)",
}


def apply(parts: set[str]) -> None:
    """Patch the layer in this process (the worker), then hook the probe around every job."""
    from app.components.worker.runtime import store, wrapper
    from bench import probe

    if "store" in parts:
        async def claim(self: Any, env: Any, *args: Any, **kwargs: Any) -> tuple[bool, int]:
            return True, env.try_

        def claim_call(self: Any, env: Any, *args: Any, **kwargs: Any) -> Any:
            import asyncio

            reply = asyncio.get_running_loop().create_future()
            reply.set_result([1, env.try_])  # what claim.lua answers when the delivery runs
            return reply

        async def finish(self: Any, *args: Any, **kwargs: Any) -> None:
            return None

        store.JobStore.claim = claim  # type: ignore[method-assign]
        store.JobStore.claim_call = claim_call  # type: ignore[method-assign]  # the runtime's first try
        store.JobStore.finish = finish  # type: ignore[method-assign]
    if "events" in parts:
        from app.components.worker import events

        events.EventPublisher.emit = lambda self, *a, **k: None  # type: ignore[method-assign]

    original = wrapper.JobRuntime._execute

    async def timed(self: Any, env: Any, raw: str) -> None:
        probe.job_start()
        await original(self, env, raw)
        probe.job_end()

    wrapper.JobRuntime._execute = timed  # type: ignore[method-assign]


def worker_main(args: list[str]) -> None:
    parts = {p for p in os.environ.get("BENCH_ABLATE", "").split(",") if p}
    apply(parts)
    sys.argv = ["app", "worker", *args]
    runpy.run_module("app", run_name="__main__", alter_sys=True)


def measure(url: str, engine: str, parts: tuple[str, ...], n: int, logs: Path) -> float:
    import redis

    from bench.common import WorkerProc, wait_probe_done, worker_env
    from bench.systems import PY
    from bench.systems.layer import Layer

    system = Layer(engine)
    r = redis.Redis.from_url(url)
    r.flushall()
    producer = system.producer(url)
    producer.bulk("noop", n)
    producer.close()
    argv = [PY, "-m", "bench.ablate", "worker", "load_test", "--backend", engine, "--threads", "10"]
    env = worker_env(url, {**system.worker_env(url, 10, "noop"), "BENCH_TARGET": str(n), "BENCH_COUNT": "process",
                           "BENCH_ABLATE": ",".join(parts)})
    worker = WorkerProc(argv, env, logs / f"ablate-{engine}-{'-'.join(parts) or 'none'}.log")
    try:
        done = wait_probe_done(r, worker, 60 + n / 20)
    finally:
        worker.stop()
    return n / max(done["last"] - done["first"], 1e-6)


def section(url: str, n: int, logs: Path, engines: tuple[str, ...] = ("arq", "dramatiq", "taskiq"),
            raw: dict[str, float] | None = None) -> list[str]:
    from bench.common import log

    table: dict[str, dict[str, float | None]] = {}
    for engine in engines:
        for name, parts in VARIANTS.items():
            log(f"ablation: {engine}, {name}")
            try:
                value: float | None = measure(url, engine, parts, n, logs)
            except Exception as exc:  # noqa: BLE001 - a patch that no longer fits the code
                log(f"ablation: {engine}, {name} failed: {exc}")
                value = None
            table.setdefault(name, {})[engine] = value
    lines = ["## What each part of the layer costs (ablation)", "",
             f"Drain of {n} no-op jobs through `app worker load_test --threads 10` with one part stubbed out "
             "by a bench-only monkeypatch (`bench/ablate.py`), timed in the worker like the raw engines "
             "(median not taken: one run each). Upper bounds of what each part costs, not proposals to drop it.", ""]
    lines += [f"- {part}: {text}" for part, text in PARTS.items()] + [""]
    lines.append("| variant | " + " | ".join(f"{e} jobs/s" for e in engines) + " |")
    lines.append("|---|" + "---:|" * len(engines))
    base = table.get("as shipped", {})
    for name, row in table.items():
        cells = []
        for e in engines:
            v, b = row.get(e), base.get(e)
            cells.append("failed" if v is None else f"{v:,.0f}" + (f" ({v / b - 1:+.0%})" if b and name != "as shipped" else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if raw:
        lines.append("| raw engine (RESULTS table) | " + " | ".join(
            f"{raw[e]:,.0f}" if raw.get(e) else "—" for e in engines) + " |")
    return lines + [""]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--only", help="comma-separated engines")
    parser.add_argument("--redis-server", help="redis-server binary (default: the newest on PATH)")
    args = parser.parse_args()
    from bench.common import RESULTS, pick_redis_server, start_redis

    server = start_redis(pick_redis_server(args.redis_server))
    os.environ["BENCH_REDIS_URL"] = server.url
    started = time.time()
    try:
        engines = tuple(args.only.split(",")) if args.only else ("arq", "dramatiq", "taskiq")
        text = section(server.url, args.jobs, RESULTS / "logs", engines)
    finally:
        server.cleanup()
    print("\n".join(text))
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
