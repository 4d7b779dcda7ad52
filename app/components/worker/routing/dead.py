"""Dead letters: the jobs that ended failed, kept per queue so an operator can see and retry them.

A job that ends ``failed`` (its last attempt failed, a non-retryable error, a worker lost on
its last attempt, a delivery the worker could not run) joins its queue's dead set
(``Keys.dead``: job ids scored by finish time, Redis's clock) in the very script that writes
its terminal state (finish.lua, reject.lua), on every engine; its record (with the envelope,
so the original arguments) and its result then live ``WORKER_DEAD_TTL_SECONDS``. Entries older
than that are trimmed lazily by those scripts, and by ``trim_dead`` here. The engines' own
dead-letter queues (Dramatiq's ``.XQ``) stay empty: the runtime acks every message.

A retry is an ordinary enqueue under the same id (fresh run, try 1, its ``job.enqueued``
event), so the layer's usual guarantees hold; the entry leaves the dead set once the new run
is accepted. Cancelled jobs are not dead.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis.asyncio as aioredis

from app.components.worker.api import Job, WorkerClient
from app.components.worker.envelope import Envelope
from app.components.worker.keys import Keys
from app.components.worker.routing.options import parse_pairs
from app.components.worker.runtime import scripts
from app.components.worker.validation import validate_job_id
from app.core.errors import AppError, JobNotFound

logger = logging.getLogger(__name__)

CHUNK = 500  # ids per purge script call / per retry batch: a few ms of Redis time each

__all__ = ["NotDead", "count_dead", "list_dead", "purge_dead", "retry_all", "retry_dead", "trim_dead"]


class NotDead(JobNotFound):
    """A job id that is not in a dead set (never failed, already retried, purged or expired)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _record_prefixes(keys: Keys, dead_key: str, prefixes: list[str]) -> list[str]:
    """Job and result key prefixes of the queue whose dead set is ``dead_key`` (on Redis
    Cluster they are the queue's own, ``<prefix>:{<queue>}:job:``; else ``prefixes``)."""
    if not keys.cluster:
        return prefixes
    queue = dead_key[len(keys.base) + 2:].removesuffix("}:dead")
    return [keys.for_queue(queue).job(""), keys.for_queue(queue).result("")]


async def trim_dead(redis: aioredis.Redis, keys: Keys, queues: list[str], ttl: int) -> int:
    """Remove entries older than ``ttl`` seconds (Redis's clock); their records expire by
    themselves. finish.lua does the same on every failure: this covers quiet queues."""
    seconds, micros = await redis.time()
    cutoff = int(seconds) * 1000 + int(micros) // 1000 - ttl * 1000
    removed = 0
    for queue in queues:
        removed += int(await redis.zremrangebyscore(keys.dead(queue), "-inf", f"({cutoff}"))
    return removed


async def count_dead(redis: aioredis.Redis, keys: Keys, queues: list[str], *, ttl: int | None = None) -> int:
    """How many dead entries the queues hold (``ttl``: trim expired ones first)."""
    if ttl is not None:
        await trim_dead(redis, keys, queues, ttl)
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zcard(keys.dead(queue))
        return sum(int(n) for n in await pipe.execute())


async def list_dead(
    redis: aioredis.Redis, keys: Keys, queues: list[str], limit: int = 100, offset: int = 0,
    *, ttl: int | None = None,
) -> list[dict[str, Any]]:
    """Dead jobs of the queues, most recent failure first: job_id, queue, task, error_type,
    error, attempts, finished_at (ms), engine. An entry whose record is gone, or whose id was
    enqueued again since (its record is no longer ``failed``), is left out."""
    if limit <= 0:
        return []
    if ttl is not None:
        await trim_dead(redis, keys, queues, ttl)
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zrevrange(keys.dead(queue), 0, offset + limit - 1, withscores=True)
        per_queue = await pipe.execute()
    entries = sorted(
        ((int(score), _text(member), queue) for queue, found in zip(queues, per_queue, strict=True)
         for member, score in found),
        key=lambda e: e[0], reverse=True,  # stable: ties keep ZREVRANGE's order
    )[offset:offset + limit]
    async with redis.pipeline(transaction=False) as pipe:
        for _, job_id, queue in entries:
            pipe.hmget(keys.for_queue(queue).job(job_id), "status", "task", "attempt", "engine")
            pipe.get(keys.for_queue(queue).result(job_id))
        replies = await pipe.execute()
    rows = []
    for index, (score, job_id, queue) in enumerate(entries):
        (status, task, attempt, engine), raw = replies[2 * index], replies[2 * index + 1]
        if status is None or _text(status) != "failed":
            continue
        result: dict[str, Any] = {}
        if raw:
            try:
                result = json.loads(raw)
            except ValueError:
                result = {}
        rows.append({
            "job_id": job_id, "queue": queue, "task": result.get("task") or _text(task or ""),
            "error_type": result.get("error_type"), "error": result.get("error"),
            "attempts": int(result.get("attempts", attempt or 0) or 0),
            "finished_at": int(result.get("finished_at") or score),
            "engine": result.get("engine") or _text(engine or ""),
        })
    return rows


def _route_of(env: Envelope) -> dict[str, Any]:
    """The enqueue options that give a retry the route its job had: priority, target, tags
    (a blank target or no tags: the task's and queue's defaults of today apply)."""
    options: dict[str, Any] = {"_priority": env.priority}
    if env.group:
        options["_worker_group"] = env.group
    if env.selector:
        options["_worker_selector"] = parse_pairs(env.selector, "worker_selector")
    if env.tags:
        options["_tags"] = env.tags
    return options


async def retry_dead(client: WorkerClient, job_id: str) -> Job:
    """Enqueue a dead job again under its id, with its task, queue and arguments (fresh run,
    try 1, a job.enqueued event); it leaves the dead set once accepted. Raises NotDead for an
    id that is not dead, AppError when its stored message cannot be read back."""
    validate_job_id(job_id)
    redis, (keys, _) = client.redis, await client.keys_of(job_id, None)  # Cluster: the queue holding it
    queue, status, raw = await redis.hmget(keys.job(job_id), "queue", "status", "envelope")
    if queue is None or await redis.zscore(keys.dead(_text(queue)), job_id) is None:
        raise NotDead(f"job {job_id!r} is not dead (never failed, already retried, purged or expired): "
                      "`app dead` lists the jobs that can be retried")
    if _text(status) != "failed":
        raise NotDead(f"job {job_id!r} was enqueued again since it failed (it is {_text(status)} now): "
                      "nothing to retry")
    try:
        if raw is None:
            raise ValueError("no stored message")
        env = Envelope.decode(raw)
    except Exception:  # noqa: BLE001 - ValueError, RecursionError, UnicodeDecodeError...
        raise AppError(f"job {job_id!r} has no readable stored message (it failed before the layer could read it), "
                       f"so it cannot be retried: remove it with `app dead purge --job {job_id}`") from None
    job = await client.enqueue(env.task, *env.args, _queue=env.queue, _job_id=env.id, **_route_of(env), **env.kwargs)
    release = redis.register_script(scripts.source("dead_release"))
    await release(keys=[keys.dead(env.queue), keys.job(job_id)], args=[job_id])
    logger.info("job %s: retried from the dead set of queue %s", job_id, env.queue)
    return job


async def retry_all(client: WorkerClient, queue: str | None = None) -> int:
    """Retry every job dead at the start of the call, in the queue or in every known queue,
    oldest first; returns how many were enqueued again. One that cannot be (its task is gone,
    its message unreadable, enqueued again meanwhile) is logged and left in the dead set."""
    queues = [queue] if queue is not None else sorted(client.registry.queues)
    retried = 0
    for name in queues:
        key = client.keys.dead(name)
        newest = await client.redis.zrevrange(key, 0, 0, withscores=True)
        if not newest:
            continue
        last, low, seen = int(newest[0][1]), "-inf", set()  # a cursor on (score, ids at that score)
        while True:
            found = await client.redis.zrangebyscore(key, low, last, start=0, num=CHUNK + len(seen), withscores=True)
            batch = [(_text(m), int(s)) for m, s in found if _text(m) not in seen]
            if not batch:
                break
            for job_id, score in batch[:CHUNK]:
                try:
                    await retry_dead(client, job_id)
                    retried += 1
                except AppError as exc:
                    logger.warning("job %s: not retried: %s", job_id, exc)
                if str(score) != low:
                    low, seen = str(score), set()
                seen.add(job_id)
    return retried


async def purge_dead(
    redis: aioredis.Redis, keys: Keys, queue: str | None = None, job_id: str | None = None,
    *, queues: list[str] | None = None,
) -> int:
    """Delete dead entries and their records and results; returns how many entries went.

    ``job_id``: that job only (in ``queue``, else the queue its record names). Otherwise
    every entry of ``queue``, else of ``queues``, else of every dead set of the prefix (SCAN).
    Entries that fail during the purge (scored after its start) are left."""
    purge = redis.register_script(scripts.source("dead_purge"))
    prefixes = [keys.job(""), keys.result("")]
    if job_id is not None:
        validate_job_id(job_id)
        if queue is None:
            found = await redis.hget(keys.job(job_id), "queue")
            if found is None:
                return 0
            queue = _text(found)
        return int(await purge(keys=[keys.dead(queue)], args=[*_record_prefixes(keys, keys.dead(queue), prefixes),
                                                              job_id]))
    if queue is not None:
        targets = [keys.dead(queue)]
    elif queues is not None:
        targets = [keys.dead(name) for name in queues]
    else:
        pattern = Keys(_glob_escape(keys.base)).dead("*")
        targets = sorted({_text(k) async for k in redis.scan_iter(match=pattern, _type="zset")})
    removed = 0
    for key in targets:
        newest = await redis.zrevrange(key, 0, 0, withscores=True)
        if not newest:
            continue
        last = int(newest[0][1])
        while ids := [_text(m) for m in await redis.zrangebyscore(key, "-inf", last, start=0, num=CHUNK)]:
            removed += int(await purge(keys=[key], args=[*_record_prefixes(keys, key, prefixes), *ids]))
    return removed
