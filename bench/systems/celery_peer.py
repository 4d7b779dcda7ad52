"""Celery with its Redis broker at documented defaults: ``celery -A ... worker -c N``
(prefork pool, so N child processes; no result backend configured)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from bench import probe
from bench.systems import PY, SyncProducer, System

app = Celery("bench", broker=os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:1")


@app.task(name="noop")
def noop() -> None:
    probe.job_start()
    probe.job_end()


@app.task(name="sleep")
def sleep() -> None:  # Celery tasks are sync: the 10 ms wait blocks its process
    probe.job_start()
    time.sleep(0.01)
    probe.job_end()


@app.task(name="stamp")
def stamp() -> None:
    probe.stamp()


TASKS = {"noop": noop, "sleep": sleep, "stamp": stamp}


class CeleryPeer(System):
    def __init__(self) -> None:
        super().__init__(key="celery", label="Celery (prefork)", family="peer", count_mode="redis",
                         notes=["prefork pool: -c N is N processes; RSS is their sum; sleep is time.sleep"])

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        return [PY, "-m", "celery", "-A", "bench.systems.celery_peer", "worker", "-c", str(concurrency)]

    def producer(self, url: str) -> CeleryProducer:
        return CeleryProducer()


class CeleryProducer(SyncProducer):
    def enqueue_fn(self, task: str) -> Callable[[], Any]:
        return TASKS[task].delay

    def bulk(self, task: str, n: int) -> float:
        raise NotImplementedError
