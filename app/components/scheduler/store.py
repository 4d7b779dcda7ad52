"""A schedule's state in Redis, and the scripts that change it.

Per schedule, under its queue's hash tag (``Keys.of_queue``):
- ``sched:<name>`` hash: ``cursor`` (Unix ms; every tick at or before it is handled),
  ``paused``, ``last_job``, ``last_tick``, ``last_fired_at``, and the counters ``fired``,
  ``missed``, ``skipped``;
- ``sched-pending:<name>`` sorted set: job ids claimed but not yet confirmed enqueued,
  scored by the end of their lease (Redis time, ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from app.components.scheduler.loader import Bound
from app.components.scheduler.plan import Plan, Span
from app.components.scheduler.ticks import iso
from app.components.worker.keys import Keys
from app.core.redis_cluster import is_cluster

LUA_DIR = Path(__file__).resolve().parent / "lua"
FINISHED = frozenset({"completed", "failed", "cancelled"})


@cache
def _source(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


def job_id(name: str, tick: int) -> str:
    """The deterministic id of one tick's job: every scheduler computes the same one."""
    return f"sched:{name}:{iso(tick)}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class State:
    cursor: int | None = None
    paused: bool = False
    last_job: str = ""
    last_tick: str = ""
    last_fired_at: int | None = None
    fired: int = 0
    missed: int = 0
    skipped: int = 0
    pending_until: int | None = None  # earliest lease end among unconfirmed ticks

    @classmethod
    def of(cls, raw: dict[Any, Any], pending: list[Any]) -> State:
        data = {_text(k): _text(v) for k, v in raw.items()}
        return cls(
            cursor=int(data["cursor"]) if data.get("cursor") else None,
            paused=data.get("paused") == "1",
            last_job=data.get("last_job", ""),
            last_tick=data.get("last_tick", ""),
            last_fired_at=int(data["last_fired_at"]) if data.get("last_fired_at") else None,
            fired=int(data.get("fired", 0)), missed=int(data.get("missed", 0)), skipped=int(data.get("skipped", 0)),
            pending_until=int(float(pending[0][1])) if pending else None,
        )


class ScheduleStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, events_maxlen: int, lease_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.events_maxlen = events_maxlen
        self.lease_ms = int(lease_s * 1000)
        self._claim = redis.register_script(_source("claim"))
        self._recover = redis.register_script(_source("recover"))

    def state_key(self, item: Bound) -> str:
        return self.keys.of_queue(item.queue, f"sched:{item.name}")

    def pending_key(self, item: Bound) -> str:
        return self.keys.of_queue(item.queue, f"sched-pending:{item.name}")

    async def snapshot(self, items: list[Bound]) -> tuple[int, dict[str, State]]:
        """Redis time (ms) and every schedule's state, in one round trip."""
        cluster = is_cluster(self.redis)  # a cluster pipeline refuses TIME (no key): asked on its own
        async with self.redis.pipeline(transaction=False) as pipe:
            if not cluster:
                pipe.time()
            for item in items:
                pipe.hgetall(self.state_key(item))
                pipe.zrange(self.pending_key(item), 0, 0, withscores=True)
            replies = await pipe.execute()
        if cluster:
            replies.insert(0, await self.redis.time())
        seconds, micros = replies[0]
        now = int(seconds) * 1000 + int(micros) // 1000
        states = {item.name: State.of(replies[1 + 2 * i], replies[2 + 2 * i]) for i, item in enumerate(items)}
        return now, states

    async def job_status(self, job_id_: str, queue: str = "") -> str | None:
        status = await self.redis.hget(self.keys.for_queue(queue).job(job_id_), "status")
        return _text(status) if status is not None else None

    async def claim(self, item: Bound, expected: str, plan: Plan, scheduler_id: str) -> bool:
        """Apply a plan if the cursor is still ``expected`` (``'*'``: a manual trigger)."""
        args: list[Any] = [expected, plan.cursor, self.lease_ms, self.events_maxlen, item.queue, item.task,
                           item.name, scheduler_id, len(plan.fire)]
        for tick, reason in plan.fire:
            args += [job_id(item.name, tick) if reason != "manual" else manual_id(item.name, tick), iso(tick), reason]
        for span in (plan.missed, plan.skipped):
            args += _span_args(span)
        reply = await self._claim(keys=[self.state_key(item), self.pending_key(item),
                                                  self.keys.for_queue(item.queue).events], args=args)
        return bool(int(reply))

    async def confirm(self, item: Bound, job_ids: list[str]) -> None:
        if job_ids:
            await self.redis.zrem(self.pending_key(item), *job_ids)

    async def recover(self, item: Bound, limit: int = 1000) -> list[str]:
        reply = await self._recover(keys=[self.pending_key(item)], args=[self.lease_ms, limit])
        return [_text(x) for x in reply]

    async def job_exists(self, job_id_: str, queue: str = "") -> bool:
        return bool(await self.redis.exists(self.keys.for_queue(queue).job(job_id_)))

    async def set_paused(self, item: Bound, paused: bool) -> None:
        await self.redis.hset(self.state_key(item), "paused", "1" if paused else "0")

    async def redis_now(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000


def manual_id(name: str, at: int) -> str:
    return f"sched:{name}:manual:{iso(at)}"


def _span_args(span: Span | None) -> list[Any]:
    if span is None:
        return [0, "", "", ""]
    return [span.count, iso(span.first), iso(span.last), span.reason]
