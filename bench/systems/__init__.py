"""The systems under test, each behind the same small interface.

A system says how to start its worker (``worker_argv``) and gives a producer that enqueues
the three probe jobs: ``noop`` (drain), ``sleep`` (10 ms async sleep) and ``stamp`` (pickup
latency). Producers time themselves, so an event loop's start-up is never in a figure.
Each system module is also what its worker imports (task definitions live there).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

PY = sys.executable
TASKS = ("noop", "sleep", "stamp")
GATHER = 500  # concurrent enqueues per batch where a client has no bulk API but is async


@dataclass
class System:
    key: str                       # short id, e.g. "arq-raw-poll"
    label: str                     # how the tables name it
    family: str                    # "raw", "layer" or "peer"
    engine: str = ""               # for raw/layer pairs: arq, dramatiq, taskiq
    count_mode: str = "process"    # see bench.probe
    slow: bool = False             # forks per job: fewer jobs in drain figures
    bulk_api: str = ""             # what "bulk" uses; "" when there is no bulk path
    notes: list[str] = field(default_factory=list)

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        raise NotImplementedError

    def worker_env(self, url: str, concurrency: int, task: str) -> dict[str, str]:
        return {}

    def producer(self, url: str) -> Producer:
        raise NotImplementedError


class Producer:
    """Enqueue probes; ``single``/``bulk`` return seconds, ``one`` the time just before enqueue."""

    def single(self, task: str, n: int) -> float:
        raise NotImplementedError

    def bulk(self, task: str, n: int) -> float:
        raise NotImplementedError

    def one(self, task: str) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class AsyncProducer(Producer):
    """A producer for an async client: one private event loop for its whole life."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.runner.run(self.setup())

    async def setup(self) -> None:
        pass

    async def teardown(self) -> None:
        pass

    def enqueue_fn(self, task: str) -> Callable[[], Awaitable[Any]]:
        raise NotImplementedError

    async def enqueue_bulk(self, task: str, n: int) -> None:
        """Default bulk path: concurrent enqueues in batches (no bulk API)."""
        fn = self.enqueue_fn(task)
        for start in range(0, n, GATHER):
            await asyncio.gather(*(fn() for _ in range(min(GATHER, n - start))))

    def single(self, task: str, n: int) -> float:
        fn = self.enqueue_fn(task)

        async def go() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                await fn()
            return time.perf_counter() - t0

        return self.runner.run(go())

    def bulk(self, task: str, n: int) -> float:
        async def go() -> float:
            t0 = time.perf_counter()
            await self.enqueue_bulk(task, n)
            return time.perf_counter() - t0

        return self.runner.run(go())

    def one(self, task: str) -> float:
        fn = self.enqueue_fn(task)

        async def go() -> float:
            t0 = time.time()
            await fn()
            return t0

        return self.runner.run(go())

    def close(self) -> None:
        self.runner.run(self.teardown())
        self.runner.close()


class SyncProducer(Producer):
    def enqueue_fn(self, task: str) -> Callable[[], Any]:
        raise NotImplementedError

    def single(self, task: str, n: int) -> float:
        fn = self.enqueue_fn(task)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0

    def one(self, task: str) -> float:
        fn = self.enqueue_fn(task)
        t0 = time.time()
        fn()
        return t0


def all_systems() -> list[System]:
    from bench.systems import arq_raw, celery_peer, dramatiq_raw, layer, rq_peer, saq_peer, streaq_peer, taskiq_raw

    return [
        arq_raw.ArqRaw(poll_delay=None), arq_raw.ArqRaw(poll_delay=0.01), layer.Layer("arq"),
        dramatiq_raw.DramatiqRaw(), layer.Layer("dramatiq"),
        taskiq_raw.TaskiqRaw(), layer.Layer("taskiq"),
        celery_peer.CeleryPeer(), rq_peer.RqPeer(), saq_peer.SaqPeer(), streaq_peer.StreaqPeer(),
    ]
