"""Pausing a queue: workers of every engine stop starting its jobs; running ones finish; new
enqueues are accepted and wait, in order.

``Keys.route(queue)`` field ``paused`` is read inside the scripts that start jobs: enqueue.lua
puts new jobs in the ready set instead of the engine, claim.lua parks a delivery that was
already in the engine (it waits in the ready set too), admit.lua admits nothing. Resuming wakes
the queue's admitters, which start the waiting jobs in order.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from app.components.worker.keys import Keys
from app.core.redis_cluster import transactional

WAKE_TOKENS = 64


async def pause(redis: aioredis.Redis, keys: Keys, queue: str) -> bool:
    """Pause ``queue``; False when it was paused already."""
    was = await is_paused(redis, keys, queue)
    await redis.hset(keys.route(queue), "paused", 1)
    return not was


async def resume(redis: aioredis.Redis, keys: Keys, queue: str) -> bool:
    """Resume ``queue`` and wake its admitters; False when it was not paused."""
    async with redis.pipeline(transaction=transactional(redis)) as pipe:
        pipe.hdel(keys.route(queue), "paused")
        pipe.lpush(keys.ready_wake(queue), *[1] * WAKE_TOKENS)
        pipe.ltrim(keys.ready_wake(queue), 0, WAKE_TOKENS - 1)
        pipe.pexpire(keys.ready_wake(queue), 60_000)
        removed, *_ = await pipe.execute()
    return bool(removed)


async def is_paused(redis: aioredis.Redis, keys: Keys, queue: str) -> bool:
    return await redis.hget(keys.route(queue), "paused") in (b"1", "1")


async def paused(redis: aioredis.Redis, keys: Keys, queues: list[str]) -> dict[str, bool]:
    """Each queue's paused state, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.hget(keys.route(queue), "paused")
        values = await pipe.execute()
    return {queue: value in (b"1", "1") for queue, value in zip(queues, values, strict=True)}
