"""A private Redis Cluster for the tests and the bench: 3 masters + 3 replicas on free ports.

Six ``redis-server --cluster-enabled yes`` (each in its own directory, via ``RedisServer``),
joined with ``redis-cli --cluster create --cluster-replicas 1``; ready once every node says
``cluster_state:ok``. Ports are chosen so that port + 10000 (the cluster bus) is free too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.core.redis_server import RedisServer, find_redis_server


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """``count`` ports whose cluster bus ports (+10000) are free too, none of Redis's defaults."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 < 65536 and port not in (6379, 16379, 26379) and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


def redis_cli() -> str:
    """redis-cli beside the redis-server in use, else on PATH."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if not found:
        pytest.skip("redis-cli not found: a Redis Cluster cannot be created")
    return found


class Cluster:
    """``masters`` masters, each with ``replicas`` replicas, on 127.0.0.1."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.masters, self.replicas = masters, replicas
        # repl-diskless-sync-delay 0: Redis 7 waits 5 s before a replica's first sync by default,
        # and a replica that never synced cannot be promoted.
        self.servers = [RedisServer(port, extra=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                                                 "--cluster-config-file", "nodes.conf",
                                                 "--repl-diskless-sync-delay", "0"])
                        for port in cluster_ports(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        return self.servers[0].url

    def start(self, timeout: float = 30.0) -> Cluster:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> Cluster:
        for server in self.servers:
            server.start()
        if self.masters == 1:  # redis-cli --cluster create wants 3 masters: slots by hand
            self._call(self.servers[0].port, "CLUSTER", "ADDSLOTS", *range(16384))
            for server in self.servers[1:]:
                self._call(server.port, "CLUSTER", "MEET", "127.0.0.1", self.servers[0].port)
        else:
            subprocess.run([redis_cli(), "--cluster", "create",
                            *(f"127.0.0.1:{s.port}" for s in self.servers),
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not all(self._ok(s.port) and self._synced(s.port) for s in self.servers):
            if time.monotonic() > deadline:
                raise RuntimeError("Redis Cluster did not reach cluster_state:ok with every replica in sync")
            time.sleep(0.05)
        return self

    def _synced(self, port: int) -> bool:
        """A master, or a replica whose link to its master is up (it can be promoted)."""
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            info = client.info("replication")
        finally:
            client.close()
        return info.get("role") == "master" or info.get("master_link_status") == "up"

    @staticmethod
    def _call(port: int, *args: object) -> object:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def _ok(self, port: int) -> bool:
        info = self._call(port, "CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.servers)}" in text

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        client = redis.RedisCluster(host="127.0.0.1", port=self.servers[0].port)
        try:
            return int(client.get_node_from_key(key).port)
        finally:
            client.close()

    def stop(self) -> None:
        for server in self.servers:
            server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    cluster = Cluster().start()
    yield cluster
    cluster.stop()


def cluster_env(cluster: Cluster, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of an ``app`` process on ``cluster`` under ``prefix`` (REDIS_CLUSTER on)."""
    from tests.conftest import BASE_ENV, ROOT

    out = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "REDIS_"))}
    out.update(BASE_ENV)
    out.update({"REDIS_URL": cluster.url, "REDIS_CLUSTER": "true", "WORKER_KEY_PREFIX": prefix,
                "PYTHONPATH": str(ROOT), "WORKFLOW_RECONCILER": "false", **extra})
    return out


class ClusterWorkers:
    """Starts ``app worker QUEUE --backend ENGINE`` on a cluster and waits for its heartbeat
    under the queue's hash tag; ``stop_all`` stops every worker it started (SIGTERM)."""

    def __init__(self, cluster: Cluster, env: dict[str, str], prefix: str) -> None:
        self.env, self.prefix = env, prefix
        self.client = redis.RedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
        self.started: list[Any] = []  # tests.conftest.WorkerProcess

    def start(self, queue: str, engine: str, *extra: str, wait: bool = True, **env_extra: str) -> Any:  # a tests.conftest.WorkerProcess
        from tests.conftest import WorkerProcess, wait_until

        worker = WorkerProcess([queue, "--backend", engine, *extra],
                               {**self.env, **{k.upper(): str(v) for k, v in env_extra.items()}})
        self.started.append(worker)
        if wait:
            beat = f"{self.prefix}:{{{queue}}}:heartbeat:{queue}:{socket.gethostname()}@{worker.proc.pid}"

            def beating() -> bool:
                if worker.proc.poll() is not None:
                    raise AssertionError(f"worker exited with {worker.proc.returncode}")
                return bool(self.client.exists(beat))

            wait_until(beating, 30, what=f"{engine} worker heartbeat on {queue}")
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        for worker in self.started:
            worker.stop(sig=None)
        self.client.close()
