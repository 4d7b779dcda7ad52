"""A Redis Cluster master failover while jobs run (REDIS_CLUSTER=true, without and with WAIT).

A private 3-master + 3-replica cluster per test (tests/cluster.py). A worker serves queue
`mail` while a producer enqueues; the master of `{mail}`'s slot is SIGKILLed and its replica
promoted by the cluster itself. Asserted: the worker rides through (it runs jobs enqueued after
the failover without a restart), no job ends twice, and every job whose enqueue returned after
the failover ends exactly once. Without WAIT, jobs acknowledged by the dead master in its last
moment may be lost (replication is asynchronous): that count is reported, not asserted. With
REDIS_WAIT_REPLICAS=1 (the old master restarted as a replica after the promotion, so WAIT can be
met again) no returned enqueue is lost.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from app.components.worker.api import WorkerClient
from app.core.settings import load_settings
from tests.cluster import Cluster, cluster_env
from tests.conftest import WorkerProcess, wait_until
from tests.faults import Producer

ENGINES = ["taskiq", "dramatiq"]
FAST = {"WORKER_OFFLINE_AFTER": "3", "WORKER_UNHEALTHY_AFTER": "2", "WORKER_WARNING_AFTER": "1"}


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    built = Cluster().start()
    yield built
    built.stop()


def _env(cluster: Cluster, prefix: str) -> dict[str, str]:
    return cluster_env(cluster, prefix, WORKER_QUEUE_PACKAGES="tests.cluster_queues", **FAST)


def _client(env: dict[str, str], engine: str) -> WorkerClient:
    values = {k.lower(): v for k, v in env.items() if k.startswith(("WORKER_", "REDIS_", "WORKFLOW_"))}
    return WorkerClient(load_settings(_env_file=None, **{**values, "worker_backend": engine}))


def _survivor(cluster: Cluster, dead_port: int) -> redis.RedisCluster:
    alive = next(s for s in cluster.servers if s.port != dead_port)
    return redis.RedisCluster(host="127.0.0.1", port=alive.port)


def _promoted(cluster: Cluster, key: str, dead_port: int) -> bool:
    """A live node says the cluster is whole and a live master serves ``key``'s slot."""
    node = redis.Redis(host="127.0.0.1", port=next(s.port for s in cluster.servers if s.port != dead_port))
    try:
        slot = int(node.execute_command("CLUSTER", "KEYSLOT", key))
        info = node.execute_command("CLUSTER", "INFO")
        slots = node.execute_command("CLUSTER", "SLOTS")
    except redis.RedisError:
        return False
    finally:
        node.close()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in info and any(
        int(start) <= slot <= int(end) and int(master[1]) != dead_port for start, end, master, *_ in slots)


def _terminal_events(client: redis.RedisCluster, prefix: str) -> Counter[str]:
    ends: Counter[str] = Counter()
    for _, fields in client.xrange(f"{prefix}:{{mail}}:events"):
        if fields.get(b"type") in (b"job.completed", b"job.failed"):
            ends[fields[b"job_id"].decode()] += 1
    return ends


@pytest.mark.parametrize(("engine", "wait"), [*((engine, 0) for engine in ENGINES), ("taskiq", 1)])
async def test_master_failover_mid_run(engine: str, wait: int, cluster: Cluster) -> None:
    prefix = f"f{uuid.uuid4().hex[:8]}"
    env = {**_env(cluster, prefix), "REDIS_WAIT_REPLICAS": str(wait), "REDIS_WAIT_TIMEOUT_MS": "500"}
    key = f"{prefix}:{{mail}}:events"
    worker = WorkerProcess(["mail", "--backend", engine], env)
    client = _client(env, engine)
    producer = Producer(lambda n: client.enqueue("add", n, 1, _queue="mail"), pause=0.005)
    try:
        watch = redis.RedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
        beat = f"{prefix}:{{mail}}:heartbeat:mail:{socket.gethostname()}@{worker.proc.pid}"
        wait_until(lambda: bool(watch.exists(beat)), 30, what=f"{engine} worker heartbeat")
        watch.close()
        task = asyncio.create_task(producer.run())
        try:
            await producer.wait_for(30, 40)
            dead_port = cluster.master_of(key)
            dead = next(s for s in cluster.servers if s.port == dead_port)
            assert dead.process is not None
            dead.process.kill()
            dead.process.wait(10)
            killed_at = len(producer.returned)
            await asyncio.to_thread(wait_until, lambda: _promoted(cluster, key, dead_port), 30, 0.1,
                                    "the replica of {mail}'s master promoted")
            if wait:  # the new master has no replica until the old one rejoins (nodes.conf) as one
                await asyncio.to_thread(dead.start)
            after = len(producer.returned)  # enqueues from here on returned from the new master
            await producer.wait_for(after + 20, 40)
        finally:
            producer.stopped = True
            await task
        assert worker.proc.poll() is None, "the worker process died in the failover"

        survivor = _survivor(cluster, dead_port)
        try:
            def settled() -> bool:
                ends = _terminal_events(survivor, prefix)
                known = [j for j in producer.returned
                         if ends[j] or survivor.exists(f"{prefix}:{{mail}}:job:{j}")]
                return all(ends[j] for j in known) and all(ends[j] for j in producer.returned[after:])

            await asyncio.to_thread(wait_until, settled, 40, 0.1, "every job the new master knows to end")
            ends = _terminal_events(survivor, prefix)
        finally:
            survivor.close()
    finally:
        await client.close()
        worker.stop()
    assert max(ends.values()) == 1, [j for j, n in ends.items() if n > 1][:5]
    assert all(ends[j] == 1 for j in producer.returned[after:])
    lost = [j for j in producer.returned if not ends[j]]
    assert not (wait and lost), lost
    print(f"\n[cluster failover] {engine} WAIT {wait}: {len(producer.returned)} enqueues returned ({killed_at} before the kill), "
          f"{len(lost)} lost with the old master, refused during the failover: {dict(producer.errors)}")
