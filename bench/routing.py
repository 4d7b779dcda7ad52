"""What each routing feature costs: drain of N no-op jobs through the layer, per engine, for a
plain queue and for each feature on (side by side, one Redis, one run).

    python bench/routing.py              # 3000 jobs, 3 runs (median), every engine
    python bench/routing.py --jobs 1000 --runs 1 --engines arq

Variants: ``plain`` (no routing: the engine's path), ``priority`` (every job ``_priority="high"``),
``max_concurrency`` (WORKER_MAX_CONCURRENCY at 1000, never binding: the lease bookkeeping),
``group`` (worker ``--group g``, jobs ``_worker_group="g"``), ``rate_limit`` (a task limited at
10,000,000/s: the sliding-window check). One worker process, concurrency 10.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import HOME, machine, median, pick_redis_server, start_redis
from bench.run import Bench
from bench.systems import PY
from bench.systems.layer import BATCH, Layer, LayerProducer

ENGINES = ("arq", "dramatiq", "taskiq")


@dataclass(frozen=True)
class Variant:
    name: str
    queue: str = "load_test"
    task: str = "noop"
    options: dict[str, Any] = field(default_factory=dict)
    argv: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


VARIANTS = (
    Variant("plain"),
    Variant("priority", options={"priority": "high"}),
    Variant("max_concurrency", env={"WORKER_MAX_CONCURRENCY_LOAD_TEST": "1000"}),
    Variant("group", options={"worker_group": "g"}, argv=("--group", "g")),
    Variant("rate_limit", queue="bench_limited", task="noop_limited"),
)


class RoutedLayer(Layer):
    def __init__(self, engine: str, variant: Variant) -> None:
        super().__init__(engine)
        self.key = f"layer-{engine}-{variant.name}"
        self.variant = variant

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        return [PY, "-m", "app", "worker", self.variant.queue, "--backend", self.engine, "--threads",
                str(concurrency), *self.variant.argv]

    def worker_env(self, url: str, concurrency: int, task: str) -> dict[str, str]:
        return {**super().worker_env(url, concurrency, task), **self.variant.env}

    def producer(self, url: str) -> LayerProducer:
        return RoutedProducer(url, self.engine, self.variant)


class RoutedProducer(LayerProducer):
    def __init__(self, url: str, engine: str, variant: Variant) -> None:
        self.variant = variant
        super().__init__(url, engine)

    async def setup(self) -> None:
        import os

        os.environ.update(self.variant.env)  # the producer knows the queue's settings, as the worker does
        await super().setup()
        self.client.queue(self.variant.queue)  # resolved now, while the environment says it
        for name in self.variant.env:
            del os.environ[name]

    async def enqueue_bulk(self, task: str, n: int) -> None:
        from app.components.worker.api import JobRequest

        v = self.variant
        for start in range(0, n, BATCH):
            await self.client.enqueue_many([JobRequest(v.task, queue=v.queue, **v.options)
                                            for _ in range(min(BATCH, n - start))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args()
    logs = HOME / "bench" / "results" / "routing-logs"
    logs.mkdir(parents=True, exist_ok=True)
    binary = pick_redis_server(None)
    server = start_redis(binary)
    try:
        bench = Bench(server.url, {}, logs)
        rows: dict[tuple[str, str], float] = {}
        for engine in args.engines.split(","):
            for variant in VARIANTS:
                system = RoutedLayer(engine, variant)
                runs = [bench.drain(system, "noop", args.jobs, 10, "drain")["jobs_s"] for _ in range(args.runs)]
                rows[(engine, variant.name)] = median(runs)
                print(f"{engine:9} {variant.name:16} {rows[(engine, variant.name)]:8.0f} jobs/s", flush=True)
    finally:
        server.stop()
    print(f"\nDrain of {args.jobs} no-op jobs, median of {args.runs}, {date.today()}, {machine(binary)}")
    print("| engine | " + " | ".join(v.name for v in VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for engine in args.engines.split(","):
        plain = rows[(engine, "plain")]
        cells = [f"{rows[(engine, v.name)]:,.0f}" + ("" if v.name == "plain" else f" ({rows[(engine, v.name)] / plain:.2f})")
                 for v in VARIANTS]
        print(f"| {engine} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
