"""SAQ at documented defaults: ``saq bench.systems.saq_peer.settings`` (concurrency N)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from saq import Queue

from bench import probe
from bench.systems import PY, AsyncProducer, System

URL = os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:1"


async def noop(ctx: dict[str, Any]) -> None:
    probe.job_start()
    probe.job_end()


async def sleep(ctx: dict[str, Any]) -> None:
    probe.job_start()
    await asyncio.sleep(0.01)
    probe.job_end()


async def stamp(ctx: dict[str, Any]) -> None:
    probe.stamp()


settings = {
    "queue": Queue.from_url(URL, name="bench"),
    "functions": [noop, sleep, stamp],
    "concurrency": int(os.environ.get("BENCH_CONCURRENCY", "10")),
}


class SaqPeer(System):
    def __init__(self) -> None:
        super().__init__(key="saq", label="SAQ", family="peer", bulk_api="asyncio.gather of enqueue (no bulk API)")

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        return [PY, "-m", "saq", "bench.systems.saq_peer.settings"]

    def worker_env(self, url: str, concurrency: int, task: str) -> dict[str, str]:
        return {"BENCH_CONCURRENCY": str(concurrency)}

    def producer(self, url: str) -> SaqProducer:
        return SaqProducer(url)


class SaqProducer(AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__()

    async def setup(self) -> None:
        self.queue = Queue.from_url(self.url, name="bench")
        await self.queue.connect()

    async def teardown(self) -> None:
        await self.queue.disconnect()

    def enqueue_fn(self, task: str) -> Callable[[], Awaitable[Any]]:
        return lambda: self.queue.enqueue(task)
