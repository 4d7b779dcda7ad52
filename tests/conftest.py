"""Test session fixtures: a private redis-server on a free port, workers as real subprocesses.

Every test gets its own key prefix, so tests never see each other's jobs, events or workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.redis_server import RedisServer
from app.core.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("arq", "dramatiq", "taskiq")

# Settings that make the suite deterministic and quick, shared by client and workers.
BASE_ENV = {
    "WORKER_QUEUE_PACKAGES": "app.components.worker.queues,tests.queues",
    "WORKER_RETRY_BACKOFF_SECONDS": "0.05",
    "WORKER_SHUTDOWN_TIMEOUT": "5",
    "WORKER_HEARTBEAT_INTERVAL": "0.2",
    "LOG_LEVEL": "WARNING",
}


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.02, what: str = "") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "", interval: float = 0.02) -> Any:
    """Await ``predicate()`` until it returns something truthy; fail after ``timeout``."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what or predicate}"
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def env(redis_url: str, prefix: str) -> dict[str, str]:
    """Environment for subprocesses (workers, CLI) of this test."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "REDIS_"))}
    out.update(BASE_ENV)
    out.update({"REDIS_URL": redis_url, "WORKER_KEY_PREFIX": prefix, "PYTHONPATH": str(ROOT)})
    return out


@pytest.fixture
def make_settings(env: dict[str, str]) -> Callable[..., object]:
    def build(**overrides: object) -> object:
        values = {k.lower(): v for k, v in env.items() if k.startswith(("WORKER_", "REDIS_"))}
        values.update(overrides)
        return load_settings(_env_file=None, **values)

    return build


@pytest.fixture
async def client(make_settings: Callable[..., Any], engine: str) -> Any:
    """A WorkerClient of this test, producing for the engine the test is parametrised with."""
    from app.components.worker.api import WorkerClient

    c = WorkerClient(make_settings(worker_backend=engine))
    yield c
    await c.close()


class WorkerProcess:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "worker", *args], env=env, cwd=ROOT)

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            if sig is not None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_worker(env: dict[str, str], redis_url: str, prefix: str) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``app worker`` in a subprocess and wait for its heartbeat (no sleeps)."""
    import redis

    started: list[WorkerProcess] = []
    clients: dict[str, redis.Redis] = {}

    def start(queue: str = "contract", engine: str = "arq", *extra: str, wait: bool = True, **env_extra: str) -> WorkerProcess:
        worker_env = {**env, **{k.upper(): str(v) for k, v in env_extra.items()}}
        worker = WorkerProcess([queue, "--backend", engine, *extra], worker_env)
        started.append(worker)
        if wait:
            url = worker_env["REDIS_URL"]
            if url not in clients:
                clients[url] = redis.Redis.from_url(url, password=worker_env.get("REDIS_PASSWORD") or None)
            client = clients[url]
            processes = int(extra[extra.index("--processes") + 1]) if "--processes" in extra else 1
            pattern = f"{prefix}:heartbeat:{queue}:*"

            def beating() -> bool:
                if worker.proc.poll() is not None:
                    raise AssertionError(f"worker exited with {worker.proc.returncode}")
                if processes == 1 and "--id" not in extra:
                    return bool(client.exists(f"{prefix}:heartbeat:{queue}:{socket.gethostname()}@{worker.proc.pid}"))
                return len(client.keys(pattern)) >= processes

            wait_until(beating, 30, what=f"{engine} worker heartbeat")
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in started:
        worker.stop(sig=None)
    for client in clients.values():
        client.close()
