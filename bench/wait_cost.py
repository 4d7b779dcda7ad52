"""What REDIS_WAIT_REPLICAS=1 costs a producer: single enqueues per second, with and without WAIT.

    python bench/wait_cost.py [--jobs 2000] [--rounds 5] [--engine arq]

A local master and one replica (redis-server on free ports, no Sentinel: WAIT does not need
it); one producer enqueues jobs one at a time (``await client.enqueue``), no worker running.
Rounds alternate the order of the two modes; the table gives each round and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from app.components.worker.api import WorkerClient
from app.core.redis_server import RedisServer
from app.core.settings import load_settings


async def rate(url: str, engine: str, jobs: int, replicas: int) -> float:
    settings = load_settings(_env_file=None, redis_url=url, worker_backend=engine, redis_wait_replicas=replicas,
                             worker_key_prefix=f"b{uuid.uuid4().hex[:8]}")
    client = WorkerClient(settings)
    try:
        for _ in range(50):  # warm up: scripts loaded, connection open
            await client.enqueue("system_health_check")
        start = time.perf_counter()
        for _ in range(jobs):
            await client.enqueue("system_health_check")
        return jobs / (time.perf_counter() - start)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine", default="arq")
    args = parser.parse_args()
    with RedisServer() as master:
        replica = RedisServer(extra=["--replicaof", "127.0.0.1", str(master.port)])
        with replica:
            link = redis.Redis(port=replica.port)
            deadline = time.monotonic() + 10
            while link.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "replica never linked"
                time.sleep(0.05)
            results: dict[int, list[float]] = {0: [], 1: []}
            for round_ in range(args.rounds):
                order = (0, 1) if round_ % 2 == 0 else (1, 0)
                for replicas in order:
                    results[replicas].append(asyncio.run(rate(master.url, args.engine, args.jobs, replicas)))
                print(f"round {round_ + 1}: no WAIT {results[0][-1]:8.0f} jobs/s   WAIT 1 {results[1][-1]:8.0f} jobs/s")
            off, on = statistics.median(results[0]), statistics.median(results[1])
            print(f"median ({args.engine}, {args.jobs} single enqueues per run): no WAIT {off:.0f} jobs/s "
                  f"({1e6 / off:.0f} us each), WAIT 1 {on:.0f} jobs/s ({1e6 / on:.0f} us each): "
                  f"ratio {on / off:.2f}, +{1e6 / on - 1e6 / off:.0f} us per enqueue")


if __name__ == "__main__":
    main()
