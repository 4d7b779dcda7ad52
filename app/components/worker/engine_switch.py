"""One engine per queue at a time, and switching engines without stranding waiting jobs.

A queue's jobs live in the keys of the engine its workers run. Two engines on one queue
would split its jobs between two sets of keys, each read by only some workers, so a worker
refuses to start on a queue that live workers serve on another engine
(``check_engine_free``). When the other engine's workers are gone (stopped, or offline
past ``WORKER_OFFLINE_AFTER``), a worker starting on the new engine takes over what still
waits in the old engine's keys: it re-sends each waiting envelope on its own engine and
only then deletes it from the old keys (``take_over``). A crash between the two leaves a
duplicate message, never a lost one, and the runtime skips a duplicate at claim. Foreign
messages (not the layer's envelope) are left where they are. While it runs, the worker
repeats this every ``SWEEP_S`` (two counts when nothing waits elsewhere), for jobs a
producer sent to the old engine during the switch.

The engines' keys are read directly, a page at a time with cursors (``waiting_pages``, also
used by ``app dequeue``): arq's sorted set of message ids with one job key per message,
Dramatiq's list plus ``.msgs`` hash, TaskIQ's stream; each message holds the layer's envelope
as the dispatcher's first argument. The work is proportional to what waits in that queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from app.components.worker.config import QueueConfig, with_engine
from app.components.worker.envelope import DISPATCH_NAME, Envelope
from app.components.worker.health import redis_now_ms
from app.components.worker.keys import Keys
from app.core.errors import EngineMismatch
from app.core.redis_cluster import transactional
from app.core.settings import ENGINES, Settings

logger = logging.getLogger(__name__)

BATCH = 1000
LOCK_MS = 10 * 60_000
SWEEP_S = 3.0  # producers cache the live engine for 2 s: catch what they sent meanwhile
Send = Callable[[list[tuple[str, str]]], Awaitable[None]]
_background: set[asyncio.Task[Any]] = set()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def live_engine_beats(redis: Any, keys: Keys, queue: str, offline_after: float) -> dict[str, int]:
    """Engine -> last beat (ms) of the queue's workers, for those beaten within the offline threshold."""
    raw = await redis.hgetall(keys.engines(queue))
    if not raw:
        return {}
    cutoff = await redis_now_ms(redis) - offline_after * 1000  # beats are written in Redis's clock
    return {_text(k): int(float(v)) for k, v in raw.items() if int(float(v)) >= cutoff}


async def check_engine_free(redis: Any, keys: Keys, queue: str, engine: str, offline_after: float) -> None:
    """Refuse a worker on ``engine`` when live workers serve ``queue`` on another engine."""
    live = await live_engine_beats(redis, keys, queue, offline_after)
    others = sorted(e for e in live if e != engine)
    if others:
        age = (await redis_now_ms(redis) - max(live[e] for e in others)) / 1000
        served = ", ".join(others)
        raise EngineMismatch(
            f"queue {queue!r} is served by live {served} workers (last beat {age:.0f}s ago): a worker on {engine} "
            f"would split its jobs across two engines; start it with --backend {others[0]}, or stop the "
            f"{served} workers first (a killed worker counts as live for WORKER_OFFLINE_AFTER={offline_after:g}s)"
        )


def ensure_engine_free(settings: Settings, queue: str, engine: str) -> None:
    """``check_engine_free`` from sync code, on a connection of its own: a supervisor checks
    once before starting N processes, instead of restarting N refused children forever."""
    from app.core.redis import async_client, ping

    async def check() -> None:
        redis = async_client(settings)
        try:
            await ping(redis, settings)
            await check_engine_free(redis, Keys.from_settings(settings).for_queue(queue), queue, engine,
                                    settings.worker_offline_after)
        finally:
            await redis.aclose()

    asyncio.run(check())


def _envelope_of(args: Any) -> tuple[str, str] | None:
    """(message id, envelope) from a dispatcher call's argument list, or None if foreign."""
    if not isinstance(args, list) or not args or not isinstance(args[0], str):
        return None
    try:
        env = Envelope.decode(args[0])
    except ValueError:
        return None
    return env.message_id, args[0]


Page = list[tuple[Any, tuple[str, str] | None]]  # (reference in the engine's keys, (message id, envelope) or None)


def _decoded(data: Any, fn_key: str) -> tuple[str, str] | None:
    try:
        message = json.loads(data) if data else None
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    if fn_key == "f" and message.get("f") != DISPATCH_NAME:
        return None
    return _envelope_of(message.get(fn_key if fn_key != "f" else "a"))


def _arq_job_prefixes(keys: Keys) -> tuple[str, ...]:
    """Where arq job keys live: under the layer's prefix, and arq's own fixed ``arq:job:``
    (older layouts), both read so a switch finds messages written by either."""
    return (f"{keys.engine_namespace('arq')}:job:", "arq:job:")


async def _arq_pages(redis: Any, keys: Keys, queue: str) -> AsyncIterator[Page]:
    zset = f"{keys.engine_namespace('arq')}:{queue}"
    ours, legacy = _arq_job_prefixes(keys)
    cursor = 0
    while True:
        cursor, members = await redis.zscan(zset, cursor, count=BATCH)
        ids = [_text(member) for member, _ in members]
        if ids:
            datas = await redis.mget([prefix + i for prefix in (ours, legacy) for i in ids])
            yield [(i, _decoded(datas[n] or datas[n + len(ids)], "f")) for n, i in enumerate(ids)]
        if int(cursor) == 0:
            return


async def _dramatiq_pages(redis: Any, keys: Keys, queue: str) -> AsyncIterator[Page]:
    # Everything in .msgs: what waits in the list and what dead consumers had fetched.
    msgs = f"{keys.engine_namespace('dramatiq')}:{queue}.msgs"
    cursor = 0
    while True:
        cursor, page = await redis.hscan(msgs, cursor, count=BATCH)
        if page:
            yield [(_text(redis_id), _decoded(data, "args")) for redis_id, data in page.items()]
        if int(cursor) == 0:
            return


async def _taskiq_pages(redis: Any, keys: Keys, queue: str) -> AsyncIterator[Page]:
    stream = f"{keys.engine_namespace('taskiq')}:{queue}"
    start = "-"
    while True:
        entries = await redis.xrange(stream, min=start, max="+", count=BATCH)
        if not entries:
            return
        yield [(_text(entry_id), _decoded(fields.get(b"data") or fields.get("data"), "args"))
               for entry_id, fields in entries]
        start = f"({_text(entries[-1][0])}"


async def delete_messages(redis: Any, keys: Keys, queue: str, engine: str, refs: list[Any]) -> None:
    """Remove messages from an engine's keys (after they were re-sent elsewhere)."""
    if engine == "arq":
        prefixes = [f"{base}{kind}:" for base in (f"{keys.engine_namespace('arq')}:", "arq:")
                    for kind in ("job", "in-progress", "retry")]
        async with redis.pipeline(transaction=transactional(redis)) as pipe:
            pipe.zrem(f"{keys.engine_namespace('arq')}:{queue}", *refs)
            pipe.delete(*(prefix + ref for ref in refs for prefix in prefixes))
            await pipe.execute()
    elif engine == "dramatiq":
        base = f"{keys.engine_namespace('dramatiq')}:{queue}"
        async with redis.pipeline(transaction=transactional(redis)) as pipe:
            pipe.hdel(f"{base}.msgs", *refs)
            for ref in refs:
                pipe.lrem(base, 0, ref)
            await pipe.execute()
    else:
        from redis.exceptions import ResponseError

        stream = f"{keys.engine_namespace('taskiq')}:{queue}"
        try:
            await redis.xack(stream, "app", *refs)
        except ResponseError:
            pass  # no consumer group yet: nothing to acknowledge
        await redis.xdel(stream, *refs)


_PAGES = {"arq": _arq_pages, "dramatiq": _dramatiq_pages, "taskiq": _taskiq_pages}


def waiting_pages(redis: Any, keys: Keys, queue: str, engine: str) -> AsyncIterator[Page]:
    """The messages an engine's keys hold for ``queue``, a page at a time (cursor-based, so
    messages removed meanwhile do not disturb it). O(messages of this queue), never a scan
    of every key."""
    return _PAGES[engine](redis, keys, queue)


async def _move(redis: Any, keys: Keys, queue: str, engine: str, send: Send) -> int:
    moved = 0
    async for page in waiting_pages(redis, keys, queue, engine):
        found = [(ref, message) for ref, message in page if message is not None]
        if found:
            await send([message for _, message in found])
            await delete_messages(redis, keys, queue, engine, [ref for ref, _ in found])
            moved += len(found)
    return moved


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

    # The counts first: on an idle queue (every sweep) they are the whole pass, two commands.
    waiting = [e for e in ENGINES if e != config.engine and await waiting_in(redis, keys, config.name, e)]
    if not waiting:
        return 0
    live = await live_engine_beats(redis, keys, config.name, settings.worker_offline_after)
    sources = [e for e in waiting if e not in live]
    if not sources:
        return 0
    lock = keys.lock(f"switch:{config.name}")
    if not await redis.set(lock, config.engine, nx=True, px=LOCK_MS):
        return 0  # a sibling process is moving them (a duplicate move would only cost a skip at claim)
    adapter = engine_class(config.engine)(settings, keys, with_engine(config, config.engine))
    moved = 0
    try:
        for source in sources:
            count = await _move(redis, keys, config.name, source, adapter.send)
            if count:
                logger.warning("queue %s: moved %d waiting job(s) from %s to %s (engine switched)",
                               config.name, count, source, config.engine)
            moved += count
    finally:
        await adapter.close()
        await redis.delete(lock)
    return moved


async def settle_engine(redis: Any, keys: Keys, settings: Settings, config: QueueConfig,
                        stop: asyncio.Event | None = None) -> int:
    """At worker start: refuse a second engine on a live queue; else announce this engine
    (so producers follow it at once) and take over what waits in another engine's keys.

    Then, until ``stop`` is set, sweep again every ``SWEEP_S`` (a few counts, O(1)): a
    producer that saw no live worker for a moment (its engine cache, or the gap when one of
    several workers stops) may have written into the default engine's keys; those jobs are
    moved here within seconds instead of waiting for the next worker start."""
    await check_engine_free(redis, keys, config.name, config.engine, settings.worker_offline_after)
    await redis.hset(keys.engines(config.name), config.engine, await redis_now_ms(redis))
    moved = await take_over(redis, keys, settings, config)
    if stop is None:
        return moved

    async def sweep() -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), SWEEP_S)
                return
            except TimeoutError:
                pass
            try:
                await take_over(redis, keys, settings, config)
            except Exception as exc:  # noqa: BLE001 - try again next round
                logger.warning("queue %s: sweep of other engines' keys failed (%s)", config.name, exc)

    task = asyncio.create_task(sweep(), name=f"engine-sweep-{config.name}")
    _background.add(task)
    task.add_done_callback(_background.discard)
    return moved
