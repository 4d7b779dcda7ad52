"""RQ at documented defaults: ``rq worker-pool -n N`` (N workers, each forks per job)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench import probe
from bench.systems import PY, SyncProducer, System


def noop() -> None:
    probe.job_start()
    probe.job_end()


def sleep() -> None:
    probe.job_start()
    time.sleep(0.01)
    probe.job_end()


def stamp() -> None:
    probe.stamp()


TASKS = {"noop": noop, "sleep": sleep, "stamp": stamp}


class RqPeer(System):
    def __init__(self) -> None:
        super().__init__(key="rq", label="RQ (worker-pool)", family="peer", count_mode="redis", slow=True,
                         bulk_api="Queue.enqueue_many (pipeline)",
                         notes=["forks a child per job; RSS is the pool's sum; sleep is time.sleep"])

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        return [PY, "-m", "rq.cli", "worker-pool", "-n", str(concurrency), "-u", url, "bench"]

    def producer(self, url: str) -> RqProducer:
        return RqProducer(url)


class RqProducer(SyncProducer):
    def __init__(self, url: str) -> None:
        from redis import Redis
        from rq import Queue

        self.queue = Queue("bench", connection=Redis.from_url(url))

    def enqueue_fn(self, task: str) -> Callable[[], Any]:
        fn = TASKS[task]
        return lambda: self.queue.enqueue(fn)

    def bulk(self, task: str, n: int) -> float:
        from rq import Queue

        fn = TASKS[task]
        t0 = time.perf_counter()
        for start in range(0, n, 1000):
            self.queue.enqueue_many([Queue.prepare_data(fn) for _ in range(min(1000, n - start))])
        return time.perf_counter() - t0
