"""Crash recovery driven by worker heartbeats, the same on every engine.

Every worker process watches the instances of its own queue. An instance whose last beat
is older than ``WORKER_OFFLINE_AFTER`` is dead: the reaper (one at a time per dead instance,
under a lock) asks the engine to return what that instance had fetched but not started,
then hands each job it was running to the runtime, which retries it (the lost attempt
counts) or fails it with WorkerLost after max_tries. Jobs of live instances are never
touched, however long they run. Recovery works on an idle queue too: it does not wait
for a new message to arrive, unlike taskiq's XAUTOCLAIM or Dramatiq's maintenance.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from app.components.worker.engines.base import EngineAdapter
from app.components.worker.envelope import now_ms
from app.components.worker.keys import Keys
from app.components.worker.runtime.wrapper import JobRuntime

logger = logging.getLogger(__name__)


class Reaper:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, runtime: JobRuntime, adapter: EngineAdapter,
        offline_after: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.runtime = runtime
        self.adapter = adapter
        self.offline_after = offline_after
        self.queue = runtime.queue.name
        self.me = runtime.worker.instance
        self.interval = max(0.1, min(1.0, offline_after / 4))
        self.recovered = 0
        self._connected_since = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"reaper-{self.queue}")

    async def _run(self) -> None:
        while True:
            try:
                # Heartbeat ages mean something only once this process has itself been
                # connected for a full offline threshold: after a Redis outage every beat
                # is old, and live workers need a moment to beat again.
                if time.monotonic() - self._connected_since >= self.offline_after:
                    await self.reap_once()
                else:
                    await self.redis.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - try again next round
                self._connected_since = time.monotonic()
                logger.warning("queue %s: crash recovery pass failed (%s)", self.queue, exc)
            await asyncio.sleep(self.interval)

    async def reap_once(self) -> int:
        now = now_ms()
        cutoff = now - int(self.offline_after * 1000)
        members = await self.redis.zrangebyscore(self.keys.instances, "-inf", cutoff, withscores=True)
        count = 0
        for member, last_beat in members:
            text = member.decode() if isinstance(member, bytes) else member
            queue, _, instance = text.partition("|")
            if queue != self.queue or instance == self.me:
                continue
            lock = self.keys.lock(f"reap:{instance}")
            if not await self.redis.set(lock, self.me, nx=True, px=60_000):
                continue
            try:
                count += await self._reap(instance, (now - last_beat) / 1000)
                await self.redis.zrem(self.keys.instances, text)
            finally:
                await self.redis.delete(lock)
        return count

    async def _reap(self, instance: str, lost_for: float) -> int:
        returned = await self.adapter.recover(instance)
        held = [m.decode() for m in await self.redis.smembers(self.keys.held(instance))]
        if held or returned:
            logger.warning("queue %s: worker instance %s is offline (%.0fs); recovering %d running job(s), "
                           "%d fetched message(s)", self.queue, instance, lost_for, len(held), returned)
        for job_id in held:
            await self.runtime.recover_lost(job_id, instance, lost_for)
        await self.redis.delete(self.keys.held(instance))
        self.recovered += len(held)
        return len(held)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
