"""Job state and results in Redis: the layer's own record of every job.

The hash ``<prefix>:job:<id>`` holds status (queued, delayed, running, completed, failed,
cancelled), the attempt count and the current envelope; ``<prefix>:result:<id>`` holds the
JSON result once the job ends. Both expire ``keep_result`` seconds after the end.
Each state change is one round trip (a Lua script or a MULTI pipeline).
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from app.components.worker.envelope import Envelope, now_ms
from app.components.worker.keys import Keys
from app.components.worker.runtime import scripts

TERMINAL = ("completed", "failed", "cancelled")


class JobStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._claim = redis.register_script(scripts.source("claim"))
        self._due = redis.register_script(scripts.source("due"))

    async def claim(self, env: Envelope, raw: str, worker_id: str) -> tuple[bool, int | str]:
        ok, value = await self._claim(
            keys=[self.keys.job(env.id), self.keys.held(worker_id)],
            args=[env.id, env.try_, worker_id, now_ms(), raw, env.queue, env.task],
        )
        if int(ok) == 1:
            return True, int(value)
        return False, value.decode() if isinstance(value, bytes) else str(value)

    async def finish(
        self, env: Envelope, worker_id: str, status: str, record: dict[str, Any], keep: int
    ) -> None:
        """Write the result and the terminal status together."""
        job_key = self.keys.job(env.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.result(env.id), json.dumps(record, default=str), ex=keep)
            pipe.hset(job_key, mapping={"status": status, "finished_at": record["finished_at"]})
            pipe.expire(job_key, keep)
            pipe.srem(self.keys.held(worker_id), env.id)
            await pipe.execute()

    async def schedule(self, env: Envelope, due_ms: int, worker_id: str | None, *, attempt: int) -> None:
        """Put a job back to wait in the delayed set (a retry, or a hand-back on shutdown)."""
        raw = env.encode()
        job_key = self.keys.job(env.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key, mapping={"status": "delayed", "attempt": attempt, "envelope": raw})
            pipe.zadd(self.keys.delayed(env.queue), {raw: due_ms})
            if worker_id:
                pipe.srem(self.keys.held(worker_id), env.id)
            await pipe.execute()

    async def take_due(self, queue: str, limit: int, lease_ms: int) -> list[str]:
        items = await self._due(keys=[self.keys.delayed(queue)], args=[now_ms(), limit, lease_ms])
        return [i.decode() if isinstance(i, bytes) else i for i in items]

    async def drop_due(self, queue: str, raws: list[str]) -> None:
        if raws:
            await self.redis.zrem(self.keys.delayed(queue), *raws)

    async def next_due_ms(self, queue: str) -> int | None:
        first = await self.redis.zrange(self.keys.delayed(queue), 0, 0, withscores=True)
        return int(first[0][1]) if first else None


async def read_result(redis: aioredis.Redis, keys: Keys, job_id: str) -> dict[str, Any] | None:
    raw = await redis.get(keys.result(job_id))
    return json.loads(raw) if raw else None


async def read_status(redis: aioredis.Redis, keys: Keys, job_id: str) -> str | None:
    status = await redis.hget(keys.job(job_id), "status")
    if status is None:
        return None
    return status.decode() if isinstance(status, bytes) else status
