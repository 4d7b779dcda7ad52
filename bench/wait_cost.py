"""What REDIS_WAIT_REPLICAS=1 costs a producer: single enqueues per second, with and without WAIT.

    python bench/wait_cost.py [--blocks 20] [--block 200] [--engine arq] [--cluster]

A local master and one replica (redis-server on free ports, no Sentinel: WAIT does not need
it); two producers, one with REDIS_WAIT_REPLICAS=1, enqueue jobs one at a time (``await
client.enqueue``) in alternating blocks, no worker running. Medians of the block times.
``--cluster``: a private Redis Cluster of 3 masters + 3 replicas instead (tests/cluster.py),
``REDIS_CLUSTER=true``, the queue's master and its replica doing the same work.
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


async def measure(url: str, engine: str, blocks: int, block: int, cluster: bool = False) -> dict[int, list[float]]:
    """Seconds per block of ``block`` single enqueues, per mode, the modes alternating block by
    block (so a noisy neighbour slows both alike)."""
    clients = {}
    for replicas in (0, 1):
        settings = load_settings(_env_file=None, redis_url=url, worker_backend=engine, redis_wait_replicas=replicas, redis_cluster=cluster,
                                 worker_key_prefix=f"b{uuid.uuid4().hex[:8]}")
        clients[replicas] = WorkerClient(settings)
    times: dict[int, list[float]] = {0: [], 1: []}
    try:
        for client in clients.values():
            for _ in range(50):  # warm up: scripts loaded, connections open
                await client.enqueue("system_health_check")
        for n in range(blocks):
            for replicas in ((0, 1) if n % 2 == 0 else (1, 0)):
                client = clients[replicas]
                start = time.perf_counter()
                for _ in range(block):
                    await client.enqueue("system_health_check")
                times[replicas].append(time.perf_counter() - start)
    finally:
        for client in clients.values():
            await client.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--block", type=int, default=200, help="single enqueues per block")
    parser.add_argument("--engine", default="arq")
    parser.add_argument("--cluster", action="store_true", help="on a 3-master Redis Cluster (one replica each)")
    args = parser.parse_args()
    if args.cluster:
        from tests.cluster import Cluster

        nodes = Cluster(3, 1).start()
        try:
            times = asyncio.run(measure(nodes.url, args.engine, args.blocks, args.block, cluster=True))
        finally:
            nodes.stop()
        report(args, times)
        return
    with RedisServer() as master:
        replica = RedisServer(extra=["--replicaof", "127.0.0.1", str(master.port)])
        with replica:
            link = redis.Redis(port=replica.port)
            deadline = time.monotonic() + 10
            while link.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "replica never linked"
                time.sleep(0.05)
            times = asyncio.run(measure(master.url, args.engine, args.blocks, args.block))
    report(args, times)


def report(args: argparse.Namespace, times: dict[int, list[float]]) -> None:
    off = args.block / statistics.median(times[0])
    on = args.block / statistics.median(times[1])
    ratios = statistics.median(b / a for a, b in zip(times[0], times[1], strict=True))
    print(f"{args.engine}{' on Cluster' if args.cluster else ''}, {args.blocks} x {args.block} single enqueues per mode, alternating blocks: "
          f"no WAIT {off:.0f} jobs/s ({1e6 / off:.0f} us each), WAIT 1 {on:.0f} jobs/s ({1e6 / on:.0f} us each); "
          f"median block time ratio WAIT/no WAIT {ratios:.2f}, +{1e6 / on - 1e6 / off:.0f} us per enqueue")


if __name__ == "__main__":
    main()
