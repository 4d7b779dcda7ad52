"""Dramatiq used directly: a ``RedisBroker`` (default middleware, plus ``AsyncIO`` for the
async sleep actor, as the docs require) and ``dramatiq.Worker(worker_threads=N)``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware.asyncio import AsyncIO

from bench import probe
from bench.systems import PY, SyncProducer, System

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:1")
broker.add_middleware(AsyncIO())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench")
def noop() -> None:
    probe.job_start()
    probe.job_end()


@dramatiq.actor(queue_name="bench")
async def sleep() -> None:
    probe.job_start()
    await asyncio.sleep(0.01)
    probe.job_end()


@dramatiq.actor(queue_name="bench")
def stamp() -> None:
    probe.stamp()


ACTORS = {"noop": noop, "sleep": sleep, "stamp": stamp}


class DramatiqRaw(System):
    def __init__(self) -> None:
        super().__init__(key="dramatiq-raw", label="dramatiq raw", family="raw", engine="dramatiq")

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        return [PY, "-m", "bench.systems.dramatiq_raw", "--concurrency", str(concurrency)]

    def producer(self, url: str) -> DramatiqProducer:
        return DramatiqProducer()


class DramatiqProducer(SyncProducer):
    def enqueue_fn(self, task: str) -> Callable[[], Any]:
        return ACTORS[task].send

    def bulk(self, task: str, n: int) -> float:
        raise NotImplementedError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    broker.emit_after("process_boot")
    worker = dramatiq.Worker(broker, worker_threads=args.concurrency)
    worker.start()
    stop.wait()
    worker.stop()
    broker.emit_before("process_stop")
    broker.close()


if __name__ == "__main__":
    main()
