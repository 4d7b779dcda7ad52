"""Throughput on Redis Cluster: 1 master vs 3 masters, same run, same machine.

    python bench/cluster.py                       # taskiq, 3 queues x 3000 jobs, 2 rounds each
    python bench/cluster.py --engine dramatiq --jobs 5000 --rounds 3

Both clusters are private (tests/cluster.py: redis-server --cluster-enabled yes on free ports,
no replicas, so both topologies do the same work per write). Per round: the three queues of
tests/cluster_queues ({mail}, {images}, {billing}: one per master on the 3-master cluster) get
N no-op jobs each (enqueue_many, one script call per queue and chunk), then one worker per queue
starts (``--threads``); the figure is jobs / (last job.completed - first job.started), both
from the queues' event streams (Redis time), and the CPU time (INFO cpu) of the busiest master
per 10,000 jobs: what spreading the queues takes off each node. Rounds alternate between the
two clusters; the medians are printed with their ratios.
Everything runs on this machine: the workers share its cores with the Redis nodes, so the
ratio says how much the layer gains from spreading queues when the workers are not the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import Cluster  # noqa: E402

QUEUES = ("mail", "images", "billing")


def _env(url: str, prefix: str, engine: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WORKER_"))}
    env.update({"REDIS_URL": url, "REDIS_CLUSTER": "true", "WORKER_KEY_PREFIX": prefix, "WORKER_BACKEND": engine,
                "WORKER_QUEUE_PACKAGES": "tests.cluster_queues", "WORKFLOW_RECONCILER": "false",
                "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING"})
    return env


async def _enqueue(env: dict[str, str], jobs: int) -> None:
    from app.components.worker.api import JobRequest, WorkerClient
    from app.core.settings import load_settings

    settings = load_settings(_env_file=None, **{k.lower(): v for k, v in env.items()
                                                if k.startswith(("REDIS_", "WORKER_", "WORKFLOW_"))})
    client = WorkerClient(settings)
    try:
        for start in range(0, jobs, 1000):
            await client.enqueue_many([JobRequest("add", (n, 1), queue=q)
                                       for q in QUEUES for n in range(start, min(jobs, start + 1000))])
    finally:
        await client.close()


def _cpu(cluster: Cluster) -> list[float]:
    """used_cpu_sys + used_cpu_user of each node (s)."""
    out = []
    for server in cluster.servers:
        node = redis.Redis(host="127.0.0.1", port=server.port)
        info = node.info("cpu")
        node.close()
        out.append(float(info["used_cpu_sys"]) + float(info["used_cpu_user"]))
    return out


def _drain(cluster: Cluster, engine: str, jobs: int, threads: int) -> tuple[float, float]:
    """(jobs/s, CPU seconds of the busiest master per 10,000 jobs) of one drain."""
    prefix = f"b{uuid.uuid4().hex[:6]}"
    env = _env(cluster.url, prefix, engine)
    asyncio.run(_enqueue(env, jobs))
    before = _cpu(cluster)
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
    workers = [subprocess.Popen([sys.executable, "-m", "app", "worker", q, "--threads", str(threads)], env=env, cwd=ROOT)
               for q in QUEUES]
    cursors = {q: "-" for q in QUEUES}
    done, first, last = 0, None, 0
    deadline = time.monotonic() + 600
    try:
        while done < jobs * len(QUEUES):
            if time.monotonic() > deadline:
                raise RuntimeError(f"drain did not end: {done} of {jobs * len(QUEUES)}")
            progressed = False
            for q in QUEUES:
                entries = client.xrange(f"{prefix}:{{{q}}}:events", min=cursors[q], max="+", count=5000)
                if entries:
                    progressed = True
                    cursors[q] = "(" + entries[-1][0].decode()
                for _, fields in entries:
                    kind, ts = fields.get(b"type"), int(fields.get(b"ts", 0))
                    if kind == b"job.started":
                        first = ts if first is None else min(first, ts)
                    elif kind in (b"job.completed", b"job.failed"):
                        done += 1
                        last = max(last, ts)
            if not progressed:
                time.sleep(0.05)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(60)
        client.close()
    assert first is not None
    busiest = max(after - then for after, then in zip(_cpu(cluster), before, strict=True))
    return jobs * len(QUEUES) / max(0.001, (last - first) / 1000), busiest * 10_000 / (jobs * len(QUEUES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="taskiq", choices=("taskiq", "dramatiq"))
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per queue per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=10)
    args = parser.parse_args()
    clusters = {1: Cluster(1, 0).start(), 3: Cluster(3, 0).start()}
    try:
        for queue in QUEUES:
            print(f"queue {queue}: master port {clusters[3].master_of(f'x:{{{queue}}}')} of 3")
        rates: dict[int, list[float]] = {1: [], 3: []}
        cpus: dict[int, list[float]] = {1: [], 3: []}
        for n in range(args.rounds):
            for masters in (1, 3) if n % 2 == 0 else (3, 1):
                rate, cpu = _drain(clusters[masters], args.engine, args.jobs, args.threads)
                rates[masters].append(rate)
                cpus[masters].append(cpu)
                print(f"round {n + 1}: {masters} master(s): {rate:,.0f} jobs/s, busiest master {cpu:.2f} CPU s "
                      "per 10k jobs")
        one, three = statistics.median(rates[1]), statistics.median(rates[3])
        cpu1, cpu3 = statistics.median(cpus[1]), statistics.median(cpus[3])
        print(f"{args.engine}, 3 queues x {args.jobs} jobs, {args.threads} threads per worker, "
              f"{os.cpu_count()} cores: 1 master {one:,.0f} jobs/s, 3 masters {three:,.0f} jobs/s, "
              f"ratio {three / one:.2f}; busiest master's CPU per 10k jobs {cpu1:.2f} s vs {cpu3:.2f} s "
              f"(ratio {cpu3 / cpu1:.2f})")
    finally:
        for cluster in clusters.values():
            cluster.stop()


if __name__ == "__main__":
    main()
