"""Job state and results in Redis: the layer's own record of every job.

The hash ``<prefix>:job:<id>`` holds status (queued, delayed, running, completed, failed,
cancelled), the attempt count, the owner instance and the current envelope;
``<prefix>:result:<id>`` holds the JSON result once the job ends. Both expire
``keep_result`` seconds after the end.

Each state change is one round trip (a Lua script or a MULTI pipeline), and carries the
lifecycle events buffered so far: an event is written atomically with the state it
reports, so a crash can never leave a completed job without its terminal event, and
publishing costs the job no round trip of its own.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from app.components.worker.envelope import Envelope, now_ms
from app.components.worker.keys import Keys
from app.components.worker.runtime import scripts

TERMINAL = ("completed", "failed", "cancelled")
Events = list[dict[str, str]]


class JobStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, events_maxlen: int = 100_000) -> None:
        self.redis = redis
        self.keys = keys
        self.events_maxlen = events_maxlen
        self._claim = redis.register_script(scripts.source("claim"))
        self._due = redis.register_script(scripts.source("due"))

    def _add_events(self, pipe: Any, events: Events) -> None:
        for event in events:
            pipe.xadd(self.keys.events, event, maxlen=self.events_maxlen, approximate=True)

    async def claim(
        self, env: Envelope, raw: str, worker_id: str, instance: str, engine: str
    ) -> tuple[bool, int | str]:
        ok, value = await self._claim(
            keys=[self.keys.job(env.id), self.keys.held(instance), self.keys.events],
            args=[env.id, env.try_, worker_id, now_ms(), raw, env.queue, env.task, instance, engine,
                  self.events_maxlen],
        )
        if int(ok) == 1:
            return True, int(value)
        return False, value.decode() if isinstance(value, bytes) else str(value)

    async def finish(
        self, env: Envelope, instance: str, status: str, record: dict[str, Any], keep: int, events: Events
    ) -> None:
        """Write the result, the terminal status and the events together."""
        job_key = self.keys.job(env.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.result(env.id), json.dumps(record, default=str), ex=keep)
            pipe.hset(job_key, mapping={"status": status, "finished_at": record["finished_at"]})
            pipe.expire(job_key, keep)
            pipe.srem(self.keys.held(instance), env.id)
            self._add_events(pipe, events)
            await pipe.execute()

    async def schedule(
        self, env: Envelope, due_ms: int, instance: str | None, *, attempt: int, events: Events = ()  # type: ignore[assignment]
    ) -> None:
        """Put a job back to wait in the delayed set (a retry, or a hand-back on shutdown)."""
        raw = env.encode()
        job_key = self.keys.job(env.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key, mapping={"status": "delayed", "attempt": attempt, "envelope": raw})
            pipe.zadd(self.keys.delayed(env.queue), {raw: due_ms})
            if instance:
                pipe.srem(self.keys.held(instance), env.id)
            self._add_events(pipe, events)
            await pipe.execute()

    async def lost_job(self, job_id: str) -> dict[str, str] | None:
        """The record of a job, as the reaper needs it."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def requeue_lost(self, env: Envelope, dead: str, attempt: int, events: Events) -> bool:
        """Put a job held by a dead instance back to wait for attempt ``attempt + 1``, only
        if it is still that instance's running attempt (WATCH: a compare-and-set)."""
        job_key = self.keys.job(env.id)
        raw = env.next_try(attempt).encode()
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(job_key)
                status, owner, current = await pipe.hmget(job_key, "status", "owner", "attempt")
                if (status, owner, current) == (b"running", dead.encode(), str(attempt).encode()):
                    pipe.multi()
                    pipe.hset(job_key, mapping={"status": "delayed", "envelope": raw})
                    pipe.zadd(self.keys.delayed(env.queue), {raw: now_ms()})
                    pipe.srem(self.keys.held(dead), env.id)
                    self._add_events(pipe, events)
                    await pipe.execute()
                    return True
                await pipe.unwatch()
            except WatchError:
                pass
        # The job moved on meanwhile: its retry event is void, the others still go out.
        others = [e for e in events if not (e["job_id"] == env.id and e["type"] == "job.retried")]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.srem(self.keys.held(dead), env.id)
            self._add_events(pipe, others)
            await pipe.execute()
        return False

    async def take_due(self, queue: str, limit: int, lease_ms: int) -> list[str]:
        items = await self._due(keys=[self.keys.delayed(queue)], args=[now_ms(), limit, lease_ms])
        return [i.decode() if isinstance(i, bytes) else i for i in items]

    async def drop_due(self, queue: str, raws: list[str]) -> None:
        if raws:
            await self.redis.zrem(self.keys.delayed(queue), *raws)


async def read_result(redis: aioredis.Redis, keys: Keys, job_id: str) -> dict[str, Any] | None:
    raw = await redis.get(keys.result(job_id))
    return json.loads(raw) if raw else None


async def read_status(redis: aioredis.Redis, keys: Keys, job_id: str) -> str | None:
    status = await redis.hget(keys.job(job_id), "status")
    if status is None:
        return None
    return status.decode() if isinstance(status, bytes) else status
