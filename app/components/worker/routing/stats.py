"""What waits for admission in a queue, by group and priority, in a few commands per queue."""

from __future__ import annotations

from typing import Any

from app.components.worker.keys import Keys
from app.components.worker.routing.options import BAND

LOW_FROM = BAND["low"] * 4398046511104  # scores of low entries start here (see enqueue.lua)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def ready_sets(redis: Any, keys: Keys, queue: str) -> list[str]:
    """Every ready set of the queue: the default group's, each group's, each selector's."""
    groups = sorted({_text(g) for g in await redis.smembers(keys.groups(queue))} - {"-"})
    selectors = sorted(_text(s) for s in await redis.smembers(keys.selectors(queue)))
    limited = sorted(_text(name) for name in await redis.smembers(keys.limited(queue)))
    return [keys.ready(queue), *(keys.ready(queue, g) for g in groups),
            *(keys.ready_selector(queue, s) for s in selectors), *(keys.of_queue(queue, name) for name in limited)]


def target_name(keys: Keys, queue: str, key: str) -> str:
    """'default', the group's name, or 'labels k=v,...' for a ready set's key."""
    rest = key[len(keys.of_queue(queue, "")):].partition("|")[0]  # a rate-limited task's set counts for its base
    if rest.startswith("ready-sel:"):
        return "labels " + rest[len("ready-sel:"):]
    group = rest[len("ready:"):]
    return "default" if group == "-" else group


async def next_ready(redis: Any, keys: Keys, queue: str) -> tuple[str, bytes] | None:
    """The ready entry that would be admitted first, across every group: (set key, entry)."""
    best: tuple[float, str, bytes] | None = None
    for key in await ready_sets(redis, keys, queue):
        head = await redis.zrange(key, 0, 0, withscores=True)
        if head and (best is None or head[0][1] < best[0]):
            best = (head[0][1], key, head[0][0])
    return None if best is None else (best[1], best[2])


async def routing_state(redis: Any, keys: Keys, queue: str) -> dict[str, Any]:
    """``paused``, ``routed``, ``leases`` (jobs running under max_concurrency) and ``waiting``:
    target -> {"high": n, "low": n} for each group or selector with jobs waiting."""
    sets = await ready_sets(redis, keys, queue)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.route(queue), "paused", "routed")
        pipe.hlen(keys.leases(queue))
        for key in sets:
            pipe.zcount(key, "-inf", f"({LOW_FROM}")
            pipe.zcount(key, LOW_FROM, "+inf")
        (paused, routed), leases, *counts = await pipe.execute()
    waiting: dict[str, dict[str, int]] = {}
    for index, key in enumerate(sets):
        high, low = counts[2 * index], counts[2 * index + 1]
        if high or low:
            counted = waiting.setdefault(target_name(keys, queue, key), {"high": 0, "low": 0})
            counted["high"] += int(high)
            counted["low"] += int(low)
    return {"paused": paused in (b"1", "1"), "routed": routed in (b"1", "1"), "leases": int(leases),
            "waiting": waiting}
