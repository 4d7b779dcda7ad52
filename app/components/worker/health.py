"""Worker heartbeats and health states (Dagu's model).

Every worker process writes ``<prefix>:heartbeat:<queue>:<worker_id>`` (JSON, with a TTL)
each ``WORKER_HEARTBEAT_INTERVAL`` seconds, and notes the engine it serves in
``<prefix>:engines:<queue>`` so producers can refuse to write into the wrong engine's keys.
The state is read from the age of the last beat: healthy, warning, unhealthy, offline; a
worker that stopped cleanly is ``stopped``. The key outlives the offline threshold by two
minutes, so a dead worker is listed as offline for a while instead of vanishing.

Every time here that is compared across processes is Redis's clock: a beat is written by a
script that stamps it with ``TIME``, and ages are computed against ``TIME`` read once per
listing, so a host whose clock is off neither looks dead nor makes others look dead.

Beyond its age, a beat carries the engine consumer's state: a process that beats but whose
consume loop keeps failing (arq under an ACL without ``INFO``) is listed ``unhealthy`` with
the reason. When beats stop because Redis refuses writes (``maxmemory`` reached with
``noeviction``), the worker cannot say so (any write is refused): it logs the OOM error, and
the listing, seeing stale beats, reads ``INFO memory`` and gives that as the reason.
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
from redis.exceptions import OutOfMemoryError

from app.components.worker.keys import Keys
from app.components.worker.runtime import scripts
from app.core.settings import Settings

logger = logging.getLogger(__name__)

LISTED_AFTER_OFFLINE_S = 120
OOM_REASON = "heartbeats failing: Redis refuses writes (OOM)"


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
        worker_id: str, instance: str, labels: dict[str, str], concurrency: int, group: str = "",
        counters: Callable[[], dict[str, int]], consumer: Callable[[], dict[str, str]] | None = None,
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
        self.group = group
        self.member = json.dumps({"group": group, "labels": labels}, separators=(",", ":"), sort_keys=True)
        self.concurrency = concurrency
        self.counters = counters
        self.consumer = consumer or (lambda: {"consumer": "running", "consumer_error": ""})
        self.started_at = time.time()
        self.failures = 0
        self.last_error = ""  # why the last beat failed, for logs (Redis cannot store it then)
        self._script = redis.register_script(scripts.source("beat"))
        self.offline_ms = int(settings.worker_offline_after * 1000)
        # (monotonic time, instances offline by Redis's clock) as of the last beat: the reaper
        # of this process reads it instead of asking Redis itself every second (runtime/reaper.py)
        self.offline_seen: tuple[float, list[str]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def payload(self, state: str | None = None) -> dict[str, Any]:
        """The beat's JSON; the beat script adds ``last_beat`` / ``last_beat_ms`` (Redis's clock)."""
        data: dict[str, Any] = {
            "worker_id": self.worker_id, "instance": self.instance, "queue": self.queue, "engine": self.engine,
            "hostname": socket.gethostname(), "pid": os.getpid(), "labels": self.labels,
            "group": self.group,
            "started_at": self.started_at, "concurrency": self.concurrency, **self.counters(), **self.consumer(),
        }
        if state:
            data["state"] = state
        return data

    def beat(self, state: str | None = None) -> None:
        """One beat, stamped by Redis. The last one (``stopped``) takes the instance off the
        reaper's list only if it holds no job: a job whose hand-back failed is recovered."""
        reply = self._script(
            keys=[self.keys.heartbeat(self.queue, self.worker_id), self.keys.workers, self.keys.engines(self.queue),
                  self.keys.instances, self.keys.held(self.instance), self.keys.members(self.queue)],
            args=[json.dumps(self.payload(state)), self.ttl, f"{self.queue}|{self.worker_id}", self.engine,
                  f"{self.queue}|{self.instance}", state or "", self.instance, self.member,
                  *([] if state else [self.offline_ms])],
        )
        if isinstance(reply, list):
            self.offline_seen = None if not isinstance(reply[1], list) else (
                time.monotonic(), [m.decode() if isinstance(m, bytes) else m for m in reply[1]])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = self.interval
        while not self._stop.wait(delay):
            try:
                self.beat()
                if self.failures:
                    logger.warning("heartbeat written again after %d failed tries (last error: %s)",
                                   self.failures, self.last_error)
                self.failures, self.last_error, delay = 0, "", self.interval
            except Exception as exc:  # noqa: BLE001 - heartbeats recover by themselves
                self.failures += 1
                self.last_error = describe_beat_error(exc)
                delay = min(1.5 ** (self.failures - 1), self.max_backoff)
                if self.failures == 1 or self.failures % self.LOG_FAILURE_EVERY == 0:
                    logger.warning("heartbeat failed %d time(s): %s; next try in %.1fs",
                                   self.failures, self.last_error, delay)

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


def describe_beat_error(exc: BaseException) -> str:
    """Why a beat failed, in words an operator acts on."""
    if isinstance(exc, OutOfMemoryError) or str(exc).startswith("OOM ") or "-OOM command not allowed" in str(exc):
        return (f"{OOM_REASON}: {exc}. This worker looks offline to `app workers` until a beat is "
                "written again: free memory in Redis or raise maxmemory")
    return f"{type(exc).__name__}: {exc}"


async def redis_now_ms(redis: aioredis.Redis) -> int:
    """Redis's clock (``TIME``), the one every beat is stamped with."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def redis_refuses_writes(redis: aioredis.Redis) -> bool:
    """True when Redis is at ``maxmemory`` and would refuse writes (read from ``INFO memory``;
    False when that cannot be told, e.g. an ACL without ``INFO``)."""
    try:
        info = await redis.info("memory")
    except Exception:  # noqa: BLE001 - a best-effort reason, never an error of its own
        return False
    maxmemory = int(info.get("maxmemory") or 0)
    policy = str(info.get("maxmemory_policy") or "")
    evicts = policy.startswith("allkeys")  # volatile-* refuses too when no key has a TTL
    return maxmemory > 0 and not evicts and int(info.get("used_memory") or 0) >= maxmemory


async def live_engines(redis: aioredis.Redis, keys: Keys, queue: str, offline_after: float) -> set[str]:
    """Engines that workers of ``queue`` announced within the offline threshold (Redis's clock)."""
    raw = await redis.hgetall(keys.engines(queue))
    if not raw:
        return set()
    cutoff = await redis_now_ms(redis) - offline_after * 1000
    return {(k.decode() if isinstance(k, bytes) else k) for k, v in raw.items() if int(float(v)) >= cutoff}


def _beat_ms(data: dict[str, Any]) -> float:
    if data.get("last_beat_ms") is not None:
        return float(data["last_beat_ms"])
    return float(data.get("last_beat", 0)) * 1000


async def list_workers(
    redis: aioredis.Redis, keys: Keys, thresholds: Thresholds, queue: str | None = None
) -> list[dict[str, Any]]:
    """Every worker whose heartbeat key still exists, with its state and, when it is not
    healthy, the reason (``reason``; empty for a healthy worker).

    States: healthy / warning / unhealthy / offline by the age of the last beat (Redis's clock);
    ``stopped`` for a clean stop; ``unhealthy`` for a live worker whose engine consumer is not
    running. Stale beats while Redis is at ``maxmemory`` give the reason ``OOM_REASON``.
    On Redis Cluster, the deployment's ``Keys`` reads every queue's own (``list_workers_of``)."""
    if keys.cluster and not keys.root:
        return await list_workers_of(redis, keys, thresholds, [], queue)
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
    now = await redis_now_ms(redis)
    workers, gone = [], []
    oom: bool | None = None
    for (q, wid, member), value in zip(pairs, values, strict=False):
        if value is None:
            gone.append(member)
            continue
        data = json.loads(value)
        age = max(0.0, (now - _beat_ms(data)) / 1000)
        stopped = data.get("state") == "stopped"
        reason = ""
        if stopped:
            state, reason = "stopped", "stopped cleanly"
        else:
            state = thresholds.state(age)
            if state != "healthy":
                if oom is None:
                    oom = await redis_refuses_writes(redis)
                reason = OOM_REASON if oom else f"no heartbeat for {age:.0f}s"
            consumer = data.get("consumer", "running")
            if consumer != "running" and state in ("healthy", "warning"):
                state = "unhealthy"
                reason = f"engine consumer {consumer}" + (f" ({data['consumer_error']})"
                                                          if data.get("consumer_error") else "")
        workers.append({
            "worker_id": wid, "queue": q, "engine": data.get("engine", ""), "state": state, "reason": reason,
            "labels": data.get("labels", {}), "group": data.get("group", ""), "last_beat_age_s": round(age, 3),
            "running": data.get("running", 0), "done": data.get("done", 0), "failed": data.get("failed", 0),
            "hostname": data.get("hostname", ""), "pid": data.get("pid"), "concurrency": data.get("concurrency"),
            "consumer": data.get("consumer", "running"), "stopped": stopped,
        })
    if gone:
        await redis.zrem(keys.workers, *gone)
    workers.sort(key=lambda w: (w["queue"], w["worker_id"]))
    return workers


async def list_workers_of(
    redis: aioredis.Redis, keys: Keys, thresholds: Thresholds, queues: list[str], queue: str | None = None,
) -> list[dict[str, Any]]:
    """``list_workers`` over a deployment: on Redis Cluster each queue keeps its own workers
    zset and heartbeats (its slot), so each of ``queues`` and of those in ``Keys.queues`` (or
    just ``queue``) is read in turn."""
    if not keys.cluster:
        return await list_workers(redis, keys, thresholds, queue)
    names = [queue] if queue else sorted({*queues, *(q.decode() if isinstance(q, bytes) else q
                                                     for q in await redis.smembers(keys.queues))})
    rows = [row for q in names for row in await list_workers(redis, keys.for_queue(q), thresholds, q)]
    rows.sort(key=lambda w: (w["queue"], w["worker_id"]))
    return rows
