"""streaq at documented defaults: ``streaq run bench.systems.streaq_peer:worker`` (concurrency N)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from streaq import Worker

from bench import probe
from bench.systems import PY, AsyncProducer, System

worker = Worker(redis_url=os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:1", queue_name="bench",
                concurrency=int(os.environ.get("BENCH_CONCURRENCY", "10")))


@worker.task
async def noop() -> None:
    probe.job_start()
    probe.job_end()


@worker.task
async def sleep() -> None:
    probe.job_start()
    await asyncio.sleep(0.01)
    probe.job_end()


@worker.task
async def stamp() -> None:
    probe.stamp()


TASKS = {"noop": noop, "sleep": sleep, "stamp": stamp}


class StreaqPeer(System):
    def __init__(self) -> None:
        super().__init__(key="streaq", label="streaq", family="peer", bulk_api="Worker.enqueue_many (pipeline)")

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        return [PY, "-m", "streaq", "run", "bench.systems.streaq_peer:worker"]

    def worker_env(self, url: str, concurrency: int, task: str) -> dict[str, str]:
        return {"BENCH_CONCURRENCY": str(concurrency)}

    def producer(self, url: str) -> StreaqProducer:
        return StreaqProducer()


class StreaqProducer(AsyncProducer):
    """streaq's client context is an anyio scope: it must be entered and left in one task,
    so a task holds it open for the producer's life."""

    async def setup(self) -> None:
        self._ready, self._stop = asyncio.Event(), asyncio.Event()
        self._holder = asyncio.create_task(self._hold())
        waiter = asyncio.create_task(self._ready.wait())
        await asyncio.wait({self._holder, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._holder.done():
            self._holder.result()

    async def _hold(self) -> None:
        async with worker:
            self._ready.set()
            await self._stop.wait()

    async def teardown(self) -> None:
        self._stop.set()
        await self._holder

    def enqueue_fn(self, task: str) -> Callable[[], Awaitable[Any]]:
        fn = TASKS[task]
        return lambda: fn.enqueue()

    async def enqueue_bulk(self, task: str, n: int) -> None:
        fn = TASKS[task]
        for start in range(0, n, 1000):
            await worker.enqueue_many([fn.enqueue() for _ in range(min(1000, n - start))])
