"""One engine per queue at a time, and switching engines without stranding waiting jobs.

A queue's jobs live in the keys of the engine its workers run. Two engines on one queue
would split its jobs between two sets of keys, each read by only some workers, so a worker
refuses to start on a queue that live workers serve on another engine
(``check_engine_free``). When the other engine's workers are gone (stopped, or offline
past ``WORKER_OFFLINE_AFTER``), a worker starting on the new engine takes over what still
waits in the old engine's keys: it re-sends each waiting envelope on its own engine and
only then deletes it from the old keys (``take_over``). A crash between the two leaves a
duplicate message, never a lost one, and the runtime skips a duplicate at claim.

The old engine's keys are read directly (their layout is in each adapter's docstring):
arq's sorted set of message ids with one ``arq:job:<id>`` key per message, Dramatiq's list
plus ``.msgs`` hash, TaskIQ's stream. Each holds the layer's envelope as the first argument
of the dispatcher. The work is proportional to what waits there, and done once per switch.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from app.components.worker.clock import now_ms
from app.components.worker.config import QueueConfig, with_engine
from app.components.worker.envelope import DISPATCH_NAME, Envelope
from app.components.worker.keys import Keys
from app.core.errors import EngineMismatch
from app.core.settings import ENGINES, Settings

logger = logging.getLogger(__name__)

BATCH = 1000
SECOND_SWEEP_S = 3.0  # producers cache the live engine for 2 s: catch what they sent meanwhile
Send = Callable[[list[tuple[str, str]]], Awaitable[None]]
_background: set[asyncio.Task[Any]] = set()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def live_engine_beats(redis: Any, keys: Keys, queue: str, offline_after: float) -> dict[str, int]:
    """Engine -> last beat (ms) of the queue's workers, for those beaten within the offline threshold."""
    raw = await redis.hgetall(keys.engines(queue))
    cutoff = now_ms() - offline_after * 1000
    return {_text(k): int(v) for k, v in raw.items() if int(v) >= cutoff}


async def check_engine_free(redis: Any, keys: Keys, queue: str, engine: str, offline_after: float) -> None:
    """Refuse a worker on ``engine`` when live workers serve ``queue`` on another engine."""
    live = await live_engine_beats(redis, keys, queue, offline_after)
    others = sorted(e for e in live if e != engine)
    if others:
        age = (now_ms() - max(live[e] for e in others)) / 1000
        served = ", ".join(others)
        raise EngineMismatch(
            f"queue {queue!r} is served by live {served} workers (last beat {age:.0f}s ago): a {engine} worker "
            f"would split its jobs across two engines; start it with --backend {others[0]}, or stop the "
            f"{served} workers first (a killed worker counts as live for WORKER_OFFLINE_AFTER={offline_after:g}s)"
        )


def _envelope_of(args: Any) -> tuple[str, str] | None:
    """(message id, envelope) from a dispatcher call's argument list, or None if foreign."""
    if not isinstance(args, list) or not args or not isinstance(args[0], str):
        return None
    try:
        env = Envelope.decode(args[0])
    except ValueError:
        return None
    return env.message_id, args[0]


async def _move_arq(redis: Any, keys: Keys, queue: str, send: Send) -> int:
    from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

    zset = f"{keys.engine_namespace('arq')}:{queue}"
    moved = 0
    while True:
        ids = [_text(i) for i in await redis.zrange(zset, 0, BATCH - 1)]
        if not ids:
            return moved
        datas = await redis.mget([job_key_prefix + i for i in ids])
        messages = []
        for data in datas:
            try:
                job = json.loads(data) if data else None
            except ValueError:
                job = None
            found = _envelope_of(job.get("a")) if isinstance(job, dict) and job.get("f") == DISPATCH_NAME else None
            if found:
                messages.append(found)
        if messages:
            await send(messages)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrem(zset, *ids)
            pipe.delete(*(prefix + i for i in ids for prefix in (job_key_prefix, in_progress_key_prefix,
                                                                   retry_key_prefix)))
            await pipe.execute()
        moved += len(messages)


async def _move_dramatiq(redis: Any, keys: Keys, queue: str, send: Send) -> int:
    base = f"{keys.engine_namespace('dramatiq')}:{queue}"
    moved = 0
    cursor = 0
    # Everything in .msgs: what waits in the list and what dead consumers had fetched.
    while True:
        cursor, page = await redis.hscan(f"{base}.msgs", cursor, count=BATCH)
        if page:
            messages = []
            for data in page.values():
                try:
                    message = json.loads(data)
                except ValueError:
                    message = None
                found = _envelope_of(message.get("args")) if isinstance(message, dict) else None
                if found:
                    messages.append(found)
            if messages:
                await send(messages)
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hdel(f"{base}.msgs", *page)
                for redis_id in page:
                    pipe.lrem(base, 0, redis_id)
                await pipe.execute()
            moved += len(messages)
        if int(cursor) == 0:
            return moved


async def _move_taskiq(redis: Any, keys: Keys, queue: str, send: Send) -> int:
    from redis.exceptions import ResponseError

    stream = f"{keys.engine_namespace('taskiq')}:{queue}"
    moved = 0
    start = "-"
    while True:
        entries = await redis.xrange(stream, min=start, max="+", count=BATCH)
        if not entries:
            return moved
        messages, ids = [], []
        for entry_id, fields in entries:
            try:
                message = json.loads(fields.get(b"data") or fields.get("data") or b"")
            except ValueError:
                message = None
            found = _envelope_of(message.get("args")) if isinstance(message, dict) else None
            if found:
                messages.append(found)
                ids.append(entry_id)
            start = f"({_text(entry_id)}"
        if messages:
            await send(messages)
        if ids:
            try:
                await redis.xack(stream, "app", *ids)
            except ResponseError:
                pass  # no consumer group yet: nothing to acknowledge
            await redis.xdel(stream, *ids)
        moved += len(messages)


_MOVERS = {"arq": _move_arq, "dramatiq": _move_dramatiq, "taskiq": _move_taskiq}


async def waiting_in(redis: Any, keys: Keys, queue: str, engine: str) -> int:
    """How many messages an engine's keys hold for ``queue`` (cheap: one count)."""
    if engine == "arq":
        return int(await redis.zcard(f"{keys.engine_namespace('arq')}:{queue}"))
    if engine == "dramatiq":
        return int(await redis.hlen(f"{keys.engine_namespace('dramatiq')}:{queue}.msgs"))
    return int(await redis.xlen(f"{keys.engine_namespace('taskiq')}:{queue}"))


async def take_over(redis: Any, keys: Keys, settings: Settings, config: QueueConfig) -> int:
    """Move what waits in other engines' keys of this queue (with no live worker there) to
    ``config.engine``; returns how many envelopes moved."""
    from app.components.worker.engines import engine_class

    live = await live_engine_beats(redis, keys, config.name, settings.worker_offline_after)
    sources = [e for e in ENGINES if e != config.engine and e not in live
               and await waiting_in(redis, keys, config.name, e)]
    if not sources:
        return 0
    adapter = engine_class(config.engine)(settings, keys, with_engine(config, config.engine))
    moved = 0
    try:
        for source in sources:
            count = await _MOVERS[source](redis, keys, config.name, adapter.send)
            if count:
                logger.warning("queue %s: moved %d waiting job(s) from %s to %s (engine switched)",
                               config.name, count, source, config.engine)
            moved += count
    finally:
        await adapter.close()
    return moved


async def settle_engine(redis: Any, keys: Keys, settings: Settings, config: QueueConfig) -> int:
    """At worker start: refuse a second engine on a live queue; else announce this engine
    (so producers follow it at once) and take over what waits in another engine's keys,
    again after producers' engine cache has expired."""
    await check_engine_free(redis, keys, config.name, config.engine, settings.worker_offline_after)
    await redis.hset(keys.engines(config.name), config.engine, now_ms())
    moved = await take_over(redis, keys, settings, config)

    async def later() -> None:
        await asyncio.sleep(SECOND_SWEEP_S)
        try:
            await take_over(redis, keys, settings, config)
        except Exception as exc:  # noqa: BLE001 - the next worker start sweeps again
            logger.warning("queue %s: second sweep of other engines' keys failed (%s)", config.name, exc)

    task = asyncio.create_task(later(), name=f"engine-sweep-{config.name}")
    _background.add(task)
    task.add_done_callback(_background.discard)
    return moved
