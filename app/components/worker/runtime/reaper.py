"""Crash recovery driven by worker heartbeats, the same on every engine.

Every worker process watches the instances of its own queue. An instance whose last beat
is older than ``WORKER_OFFLINE_AFTER`` is dead: the reaper (one at a time per dead instance,
under a lock) asks the engine to return what that instance had fetched but not started,
then hands each job it was running to the runtime, which retries it (the lost attempt
counts) or fails it with WorkerLost after max_tries. Jobs of live instances are never
touched, however long they run. Recovery works on an idle queue too: it does not wait
for a new message to arrive, unlike taskiq's XAUTOCLAIM or Dramatiq's maintenance.

"Older" is judged by Redis's clock: beats are stamped with ``TIME`` and the cutoff is
computed in a script, so a host whose clock runs ahead cannot reap live workers. Jobs are
recovered one by one (each recovery removes its job from the held set in the same script),
and the instance leaves the watch list only when its held set is empty and it is still
offline, atomically: a claim made meanwhile is never dropped, and a frozen worker that
beats again is live again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from app.components.worker.engines.base import EngineAdapter
from app.components.worker.keys import Keys
from app.components.worker.runtime import scripts
from app.components.worker.runtime.wrapper import JobRuntime

logger = logging.getLogger(__name__)


class Reaper:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, runtime: JobRuntime, adapter: EngineAdapter,
        offline_after: float, heartbeat: Any = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.runtime = runtime
        self.adapter = adapter
        self.offline_after = offline_after
        self.queue = runtime.queue.name
        self.me = runtime.worker.instance
        self.interval = max(0.1, min(1.0, offline_after / 4))
        # A reaper killed mid-pass must not hold back the rest of a dead instance's jobs for
        # long: its lock lapses after the offline threshold (5 s at least). A pass that outlives
        # it may meet a second reaper; both are safe, since every recovery is a compare-and-set.
        self.lock_ms = int(max(5.0, offline_after) * 1000)
        self.recovered = 0
        self._offline = redis.register_script(scripts.source("offline"))
        self._forget = redis.register_script(scripts.source("forget"))
        self._connected_since = time.monotonic()
        # This process's Heartbeat: each beat also lists the offline instances (beat.lua), so
        # while its beats are fresh and list none of this queue, a pass sends nothing.
        self.heartbeat = heartbeat
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"reaper-{self.queue}")

    async def _run(self) -> None:
        while True:
            try:
                # Heartbeat ages mean something only once this process has itself been
                # connected for a full offline threshold: after a Redis outage every beat
                # is old, and live workers need a moment to beat again.
                seen = self._seen_by_beat()
                if seen is not None:
                    # The beat reached Redis moments ago (connected), and says who is offline.
                    others = [m for m in seen if m.startswith(f"{self.queue}|") and m != f"{self.queue}|{self.me}"]
                    if others and time.monotonic() - self._connected_since >= self.offline_after:
                        await self.reap_once()  # asks Redis again: the list is up to a beat old
                elif time.monotonic() - self._connected_since >= self.offline_after:
                    await self.reap_once()
                else:
                    await self.redis.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - try again next round
                self._connected_since = time.monotonic()
                logger.warning("queue %s: crash recovery pass failed (%s)", self.queue, exc)
            await asyncio.sleep(self.interval)

    def _seen_by_beat(self) -> list[str] | None:
        """The offline instances the last beat listed, if it is fresh (at most two beats and a
        second old) and beats come at least as often as this reaper's passes; else None: the
        reaper asks Redis itself."""
        heartbeat = self.heartbeat
        seen = getattr(heartbeat, "offline_seen", None)
        if seen is None or heartbeat.interval > self.interval:
            return None
        at, members = seen
        if time.monotonic() - at > 2 * heartbeat.interval + 1:
            return None
        return members

    async def reap_once(self) -> int:
        offline_ms = int(self.offline_after * 1000)
        found = await self._offline(keys=[self.keys.instances], args=[offline_ms])
        count = 0
        for member, age_ms in zip(found[::2], found[1::2], strict=True):
            text = member.decode() if isinstance(member, bytes) else member
            queue, _, instance = text.partition("|")
            if queue != self.queue or instance == self.me:
                continue
            lock = self.keys.lock(f"reap:{instance}")
            if not await self.redis.set(lock, self.me, nx=True, px=self.lock_ms):
                continue
            try:
                count += await self._reap(instance, int(age_ms) / 1000)
                forgotten = await self._forget(
                    keys=[self.keys.instances, self.keys.held(instance), self.keys.members(self.queue)],
                    args=[text, offline_ms, instance])
                if int(forgotten) == 0:
                    logger.warning("queue %s: instance %s still holds jobs; trying again next pass",
                                   self.queue, instance)
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
            # Each recovery takes its job out of the held set in the same script as its new state.
            await self.runtime.recover_lost(job_id, instance, lost_for)
        self.recovered += len(held)
        return len(held)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
