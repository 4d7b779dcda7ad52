"""The layer itself: ``app worker QUEUE --backend E --threads N`` and ``WorkerClient``.

Drain figures come from the layer's own event stream (first ``job.started`` to the last
terminal event), the way an operator would read them; events and heartbeats stay on.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from bench.systems import PY, AsyncProducer, System

QUEUES = "app.components.worker.queues,bench.layer_queues"
BATCH = 1000
# probe -> (task, queue, kwargs)
TASKS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "noop": ("noop", "load_test", {}),
    "sleep": ("io_simulation_task", "load_test", {"duration_ms": 10}),
    "stamp": ("stamp", "bench", {}),
    "probe_noop": ("noop", "bench", {}),  # bench/scale.py: counted by bench.probe like the raw engines
}


def layer_env(url: str, engine: str) -> dict[str, str]:
    return {"REDIS_URL": url, "WORKER_BACKEND": engine, "WORKER_QUEUE_PACKAGES": QUEUES,
            "WORKER_KEY_PREFIX": "worker"}


class Layer(System):
    def __init__(self, engine: str) -> None:
        super().__init__(key=f"layer-{engine}", label=f"layer on {engine}", family="layer", engine=engine,
                         bulk_api="WorkerClient.enqueue_many (batches of 1000)")

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        return [PY, "-m", "app", "worker", TASKS[task][1], "--backend", self.engine, "--threads", str(concurrency)]

    def worker_env(self, url: str, concurrency: int, task: str) -> dict[str, str]:
        return layer_env(url, self.engine)

    def producer(self, url: str) -> LayerProducer:
        return LayerProducer(url, self.engine)


class LayerProducer(AsyncProducer):
    def __init__(self, url: str, engine: str) -> None:
        self.url = url
        self.engine = engine
        super().__init__()

    async def setup(self) -> None:
        from app.components.worker.api import WorkerClient
        from app.core.settings import load_settings

        for name in [k for k in os.environ if k.startswith("WORKER_BACKEND_")]:
            del os.environ[name]
        values = {k.lower(): v for k, v in layer_env(self.url, self.engine).items()}
        self.client = WorkerClient(load_settings(_env_file=None, **values))

    async def teardown(self) -> None:
        await self.client.close()

    def enqueue_fn(self, task: str) -> Callable[[], Awaitable[Any]]:
        name, queue, kwargs = TASKS[task]
        return lambda: self.client.enqueue(name, _queue=queue, **kwargs)

    async def enqueue_bulk(self, task: str, n: int) -> None:
        from app.components.worker.api import JobRequest

        name, queue, kwargs = TASKS[task]
        for start in range(0, n, BATCH):
            await self.client.enqueue_many([JobRequest(name, kwargs=kwargs, queue=queue)
                                            for _ in range(min(BATCH, n - start))])
