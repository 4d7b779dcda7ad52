"""Worker heartbeats and health states (Dagu's model).

Every worker process writes ``<prefix>:heartbeat:<queue>:<worker_id>`` (JSON, with a TTL)
each ``WORKER_HEARTBEAT_INTERVAL`` seconds, and notes the engine it serves in
``<prefix>:engines:<queue>`` so producers can refuse to write into the wrong engine's keys.
The state is read from the age of the last beat: healthy, warning, unhealthy, offline. The
key outlives the offline threshold by two minutes, so a dead worker is listed as offline
for a while instead of vanishing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis as redis_sync
import redis.asyncio as aioredis

from app.components.worker.envelope import now_ms
from app.components.worker.keys import Keys
from app.core.settings import Settings

logger = logging.getLogger(__name__)

LISTED_AFTER_OFFLINE_S = 120


def default_worker_id() -> str:
    return f"{socket.gethostname()}@{os.getpid()}"


@dataclass(frozen=True)
class Thresholds:
    warning: float = 5.0
    unhealthy: float = 15.0
    offline: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(settings.worker_warning_after, settings.worker_unhealthy_after, settings.worker_offline_after)

    def state(self, age_s: float) -> str:
        if age_s > self.offline:
            return "offline"
        if age_s > self.unhealthy:
            return "unhealthy"
        if age_s >= self.warning:
            return "warning"
        return "healthy"


class Heartbeat:
    """Writes this process's heartbeat from its own thread until stopped.

    A thread, not a task on the event loop: a task that blocks the loop (CPU-bound code in
    an ``async def``) must not make a live worker look dead, or crash recovery would hand
    its running jobs to another worker while it still runs them.

    A failed beat backs off 1 s, x1.5, up to 15 s, but never beyond a third of the offline
    threshold: once Redis is back the worker must beat before others judge it offline. The
    log says so on the first failure and then every ``LOG_FAILURE_EVERY`` tries.
    """

    LOG_FAILURE_EVERY = 30

    def __init__(
        self, redis: redis_sync.Redis, keys: Keys, settings: Settings, *, queue: str, engine: str,
        worker_id: str, instance: str, labels: dict[str, str], concurrency: int,
        counters: Callable[[], dict[str, int]],
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.interval = settings.worker_heartbeat_interval
        self.max_backoff = min(15.0, max(self.interval, settings.worker_offline_after / 3))
        self.ttl = int(settings.worker_offline_after + LISTED_AFTER_OFFLINE_S)
        self.queue = queue
        self.engine = engine
        self.worker_id = worker_id
        self.instance = instance
        self.labels = labels
        self.concurrency = concurrency
        self.counters = counters
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def payload(self, state: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "worker_id": self.worker_id, "instance": self.instance, "queue": self.queue, "engine": self.engine,
            "hostname": socket.gethostname(), "pid": os.getpid(), "labels": self.labels,
            "started_at": self.started_at, "last_beat": time.time(), "concurrency": self.concurrency,
            **self.counters(),
        }
        if state:
            data["state"] = state
        return data

    def beat(self, state: str | None = None) -> None:
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.heartbeat(self.queue, self.worker_id), json.dumps(self.payload(state)), ex=self.ttl)
        pipe.zadd(self.keys.workers, {f"{self.queue}|{self.worker_id}": now})
        if state == "stopped":
            # Stopped on purpose, running jobs drained or handed back: nothing to recover.
            pipe.hdel(self.keys.engines(self.queue), self.engine)
            pipe.zrem(self.keys.instances, f"{self.queue}|{self.instance}")
            pipe.delete(self.keys.held(self.instance))
        else:
            pipe.hset(self.keys.engines(self.queue), self.engine, now)
            pipe.zadd(self.keys.instances, {f"{self.queue}|{self.instance}": now})
        pipe.execute()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        delay = self.interval
        while not self._stop.wait(delay):
            try:
                self.beat()
                if failures:
                    logger.warning("heartbeat written again after %d failed tries", failures)
                failures, delay = 0, self.interval
            except Exception as exc:  # noqa: BLE001 - heartbeats recover by themselves
                failures += 1
                delay = min(1.5 ** (failures - 1), self.max_backoff)
                if failures == 1 or failures % self.LOG_FAILURE_EVERY == 0:
                    logger.warning("heartbeat failed %d time(s) (%s); next try in %.1fs", failures, exc, delay)

    def _stop_and_mark(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        try:
            self.beat(state="stopped")
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not write the last heartbeat: %s", exc)
        self.redis.close()

    async def stop(self) -> None:
        """Stop beating and leave a last beat that says the worker stopped on purpose."""
        await asyncio.to_thread(self._stop_and_mark)


async def live_engines(redis: aioredis.Redis, keys: Keys, queue: str, offline_after: float) -> set[str]:
    """Engines that workers of ``queue`` announced within the offline threshold."""
    raw = await redis.hgetall(keys.engines(queue))
    cutoff = now_ms() - offline_after * 1000
    return {(k.decode() if isinstance(k, bytes) else k) for k, v in raw.items() if int(v) >= cutoff}


async def list_workers(
    redis: aioredis.Redis, keys: Keys, thresholds: Thresholds, queue: str | None = None
) -> list[dict[str, Any]]:
    """Every worker whose heartbeat key still exists, with its state."""
    members = await redis.zrange(keys.workers, 0, -1)
    pairs = []
    for member in members:
        text = member.decode() if isinstance(member, bytes) else member
        q, _, wid = text.partition("|")
        if queue is None or q == queue:
            pairs.append((q, wid, text))
    if not pairs:
        return []
    values = await redis.mget([keys.heartbeat(q, w) for q, w, _ in pairs])
    now = time.time()
    workers, gone = [], []
    for (q, wid, member), value in zip(pairs, values, strict=False):
        if value is None:
            gone.append(member)
            continue
        data = json.loads(value)
        age = max(0.0, now - float(data.get("last_beat", 0)))
        state = "offline" if data.get("state") == "stopped" else thresholds.state(age)
        workers.append({
            "worker_id": wid, "queue": q, "engine": data.get("engine", ""), "state": state,
            "labels": data.get("labels", {}), "last_beat_age_s": round(age, 3),
            "running": data.get("running", 0), "done": data.get("done", 0), "failed": data.get("failed", 0),
            "hostname": data.get("hostname", ""), "pid": data.get("pid"), "concurrency": data.get("concurrency"),
            "stopped": data.get("state") == "stopped",
        })
    if gone:
        await redis.zrem(keys.workers, *gone)
    workers.sort(key=lambda w: (w["queue"], w["worker_id"]))
    return workers
