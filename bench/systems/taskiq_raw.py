"""TaskIQ used directly: taskiq-redis ``RedisStreamBroker`` at its defaults and
``Receiver(broker, max_async_tasks=N).listen()`` (what ``taskiq worker`` runs in each process)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

from bench import probe
from bench.systems import PY, AsyncProducer, System

broker = RedisStreamBroker(os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:1", queue_name="bench")


@broker.task(task_name="noop")
async def noop() -> None:
    probe.job_start()
    probe.job_end()


@broker.task(task_name="sleep")
async def sleep() -> None:
    probe.job_start()
    await asyncio.sleep(0.01)
    probe.job_end()


@broker.task(task_name="stamp")
async def stamp() -> None:
    probe.stamp()


TASKS = {"noop": noop, "sleep": sleep, "stamp": stamp}


class TaskiqRaw(System):
    def __init__(self) -> None:
        super().__init__(key="taskiq-raw", label="taskiq raw", family="raw", engine="taskiq",
                         bulk_api="asyncio.gather of kiq (no bulk API)")

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        return [PY, "-m", "bench.systems.taskiq_raw", "--concurrency", str(concurrency)]

    def producer(self, url: str) -> TaskiqProducer:
        return TaskiqProducer()


class TaskiqProducer(AsyncProducer):
    async def setup(self) -> None:
        # A producer's startup creates the consumer group (at '$'): jobs sent after it are kept.
        await broker.startup()

    async def teardown(self) -> None:
        await broker.shutdown()

    def enqueue_fn(self, task: str) -> Callable[[], Awaitable[Any]]:
        return TASKS[task].kiq


async def serve(concurrency: int) -> None:
    finish = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, finish.set)
    broker.is_worker_process = True
    await broker.startup()
    await Receiver(broker, max_async_tasks=concurrency).listen(finish)
    await broker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=10)
    asyncio.run(serve(parser.parse_args().concurrency))


if __name__ == "__main__":
    main()
