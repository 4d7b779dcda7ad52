"""A Sentinel topology on free ports: one master, one replica, three ``redis-server --sentinel``.

Everyone reaches the master through a small TCP proxy (``LinkProxy``): the Sentinels monitor
the proxy's port, the replica replicates through it, clients connect to it. The proxy can
drop what the master sends to the replica (``freeze_replication``) while the link stays up:
a replica that lags behind, as across a slow or partitioned network, so the writes of that
moment live on the master only; then ``kill_master`` loses them, as a real failover would.

``SentinelTopology().start()`` returns once every Sentinel names the same master, sees the two
other Sentinels and the replica, and the replica's link to the master is up; ``stop()`` ends
every process. ``kill_master()`` SIGKILLs the master and ``wait_failover()`` waits until every
Sentinel names the replica as the new master and the new master accepts writes.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.core.redis_server import RedisServer, find_redis_server, free_port

MASTER_NAME = "apptest"
FAST_SYNC = ("--repl-diskless-sync-delay", "0")
DOWN_AFTER_MS = 1000  # a killed master is subjectively down after this long; then the vote starts


def _until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class LinkProxy:
    """Forwards a port to the master; can drop the master-to-replica stream (replication
    connections are the ones whose client sends SYNC or PSYNC)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="link-proxy").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=1)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the master is down: so is its address
                continue
            self.sockets += [client, upstream]
            link = {"replication": False}
            threading.Thread(target=self._pump, args=(client, upstream, link, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, link, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, link: dict[str, bool], from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and not link["replication"] and (b"PSYNC" in data.upper() or b"\r\nSYNC" in data.upper()):
                    link["replication"] = True
                if not from_client and link["replication"] and self.frozen.is_set():
                    continue  # never reaches the replica
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass


class SentinelTopology:
    def __init__(self, name: str = MASTER_NAME, sentinels: int = 3) -> None:
        self.name = name
        # No 5 s wait before a diskless full sync (Redis 7's default), for the replica and for an
        # old master that comes back as a replica of the new one.
        self.master = RedisServer(extra=list(FAST_SYNC))
        self.replica = RedisServer()
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []
        self.proxy: LinkProxy | None = None
        self.dir = tempfile.mkdtemp(prefix="app-sentinel-")

    @property
    def sentinels(self) -> str:
        """The REDIS_SENTINELS value."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        return {"REDIS_SENTINELS": self.sentinels, "REDIS_SENTINEL_MASTER": self.name,
                # Never used for the address while Sentinels are set: a port nothing listens on proves it.
                "REDIS_URL": f"redis://127.0.0.1:{free_port()}"}

    def start(self) -> SentinelTopology:
        self.master.start()
        self.proxy = LinkProxy(self.master.port)
        self.replica.extra = [*FAST_SYNC, "--replicaof", "127.0.0.1", str(self.proxy.port)]
        self.replica.start()
        ids = {port: f"{port:040x}" for port in self.sentinel_ports}
        for port in self.sentinel_ports:
            conf = Path(self.dir) / f"sentinel-{port}.conf"
            # Each Sentinel knows the others from the start (they would find them through the
            # master's hello channel within about 2 s).
            known = "".join(f"sentinel known-sentinel {self.name} 127.0.0.1 {other} {ids[other]}\n"
                            for other in self.sentinel_ports if other != port)
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\nsentinel myid {ids[port]}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.proxy.port} 2\n"
                f"sentinel down-after-milliseconds {self.name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.name} 10000\n"
                f"sentinel parallel-syncs {self.name} 1\n{known}"
            )
            self.sentinel_procs.append(subprocess.Popen(
                [find_redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT, start_new_session=True))
        _until(lambda: self._agreed(self.proxy.port, replicas=1), 30, "the Sentinels to agree on the master")
        _until(lambda: self.client(self.replica.port).info("replication").get("master_link_status") == "up",
               10, "the replica's link to the master")
        return self

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)

    def _agreed(self, master_port: int, replicas: int) -> bool:
        for port in self.sentinel_ports:
            with self.client(port) as sentinel:
                state = sentinel.sentinel_master(self.name)
                if int(state["port"]) != master_port or not state["is_master"] or state["is_sdown"]:
                    return False
                if state["num-other-sentinels"] < len(self.sentinel_ports) - 1 or state["num-slaves"] < replicas:
                    return False
        return True

    def master_port(self) -> int:
        with self.client(self.sentinel_ports[0]) as sentinel:
            return int(sentinel.sentinel_get_master_addr_by_name(self.name)[1])

    def master_client(self) -> redis.Redis:
        """A plain client of the current master (what the Sentinels name now)."""
        return self.client(self.master_port())

    def freeze_replication(self) -> None:
        """From now on the replica gets nothing more from the master (its link stays up)."""
        assert self.proxy is not None
        self.proxy.frozen.set()

    def kill_master(self) -> None:
        """SIGKILL the master: no goodbye to anyone, what a crashed host looks like."""
        assert self.master.process is not None
        self.master.process.send_signal(signal.SIGKILL)
        self.master.process.wait()

    def wait_failover(self, timeout: float = 30) -> None:
        def promoted() -> bool:
            if not self._agreed_on(self.replica.port):
                return False
            with self.client(self.replica.port) as new:
                return new.info("replication")["role"] == "master"

        _until(promoted, timeout, "the Sentinels to promote the replica")

    def _agreed_on(self, port: int) -> bool:
        for sentinel_port in self.sentinel_ports:
            with self.client(sentinel_port) as sentinel:
                if int(sentinel.sentinel_get_master_addr_by_name(self.name)[1]) != port:
                    return False
        return True

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinel_procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.proxy is not None:
            self.proxy.close()
        self.master.cleanup()
        self.replica.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def sentinel_topology() -> Iterator[SentinelTopology]:
    """A fresh topology for one test (a failover changes it)."""
    topology = SentinelTopology().start()
    yield topology
    topology.stop()


@pytest.fixture(scope="module")
def shared_sentinel_topology() -> Iterator[SentinelTopology]:
    """One topology for the tests of a module that do not fail it over."""
    topology = SentinelTopology().start()
    yield topology
    topology.stop()


def redis_server_version() -> tuple[int, ...]:
    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, check=True).stdout
    version = out.split("v=", 1)[1].split()[0]
    return tuple(int(part) for part in version.split("."))
