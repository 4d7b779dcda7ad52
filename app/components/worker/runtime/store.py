"""Job state and results in Redis: the layer's own record of every job.

The hash ``<prefix>:job:<id>`` holds status (queued, delayed, running, completed, failed,
cancelled), the attempt count, the owner instance and the current envelope;
``<prefix>:result:<id>`` holds the JSON result once the job ends. Both expire
``keep_result`` seconds after the end; a job that ends failed also joins its queue's dead set
(``Keys.dead``) in the same script, and then both live as long as its entry (``dead_ttl``).

Each state change is one Lua script (one round trip) that checks it still applies (a
compare-and-set on status, owner and attempt) and carries the job's lifecycle events: an
event is written atomically with the state it reports, exactly once even when a write is
retried after a lost reply, and publishing costs the job no round trip of its own.

Times written here that other processes compare (finished_at, due times, event timestamps)
are Redis's clock (``TIME`` inside the scripts): a retry's backoff travels as a delay, and
the script adds it to Redis's now.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from app.components.worker.envelope import Envelope
from app.components.worker.keys import Keys
from app.components.worker.runtime import scripts
from app.components.worker.runtime.ack import EngineAck
from app.components.worker.runtime.batch import ScriptBatcher

Events = list[dict[str, str]]
DEAD_TTL_S = 604_800  # WORKER_DEAD_TTL_SECONDS's default


class JobStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, events_maxlen: int = 100_000,
                 dead_ttl: int = DEAD_TTL_S) -> None:
        self.redis = redis
        self.keys = keys
        self.events_maxlen = events_maxlen
        self.dead_ttl = dead_ttl
        self._due = redis.register_script(scripts.source("due"))
        self._route = redis.register_script(scripts.source("route"))
        self._admit = redis.register_script(scripts.source("admit"))
        self._poison = redis.register_script(scripts.source("poison"))
        self._batch = ScriptBatcher(redis, {name: scripts.source(name) for name in ("claim", "finish", "requeue", "reject")})

    def set_flush_defer(self, iterations: int) -> None:
        """How many loop iterations a batch of claims and finishes may wait for others (batch.py)."""
        self._batch.max_defer = iterations

    async def claim(
        self, env: Envelope, worker_id: str, instance: str, engine: str, delivery: str
    ) -> tuple[bool, int | str]:
        """Take this delivery if it is the current one of its job: same run, waiting, for this
        attempt. ``delivery`` is unique per message handled: a retried call of this claim (its
        reply lost) is recognised by it; a second delivery of the same message is not.
        Returns (True, attempt) or (False, reason), reason ``norecord`` when no record exists."""
        return self.claimed(await self.claim_call(env, worker_id, instance, engine, delivery))

    def claim_call(self, env: Envelope, worker_id: str, instance: str, engine: str, delivery: str) -> asyncio.Future[Any]:
        """``claim`` as a future of the script's raw reply (read it with ``claimed``)."""
        return self._batch.submit(
            "claim",
            [self.keys.job(env.id), self.keys.held(instance), self.keys.events],
            [env.id, env.try_, worker_id, env.run, env.queue, env.task, instance, engine,
             self.events_maxlen, delivery, self.keys.of_queue(env.queue, ""), env.tags_text, env.priority,
             env.group, env.selector, env.task if env.limited else ""],
        )

    @staticmethod
    def claimed(reply: Any) -> tuple[bool, int | str]:
        ok, value = reply
        if int(ok) == 1:
            return True, int(value)
        return False, value.decode() if isinstance(value, bytes) else str(value)

    async def reject(
        self, job_id: str, run: str | None, try_: int, queue: str, task: str, engine: str,
        record: dict[str, Any], keep: int, events: Events,
    ) -> bool:
        """End a job whose delivery cannot run (undecodable, or no record) as failed, with its
        events, once; the script adds ``finished_at`` to ``record`` (Redis's clock).
        ``run=None`` / ``try_=0``: not known (read from a broken message).
        False when that delivery is not the job's current one: nothing is written."""
        done = await self._batch.call(
            "reject",
            [self.keys.job(job_id), self.keys.result(job_id), self.keys.events, self.keys.dead(queue)],
            [job_id, "*" if run is None else run, try_, queue, task, engine, keep, self.events_maxlen,
             json.dumps(record, default=str), self.dead_ttl, *(json.dumps(e) for e in events)],
        )
        return bool(int(done))

    async def finish(
        self, env: Envelope, owner: str, attempt: int, status: str, record: dict[str, Any], keep: int,
        events: Events, ack: EngineAck | None = None,
    ) -> bool:
        """Write the result, the terminal status and the job's events together, once. The
        script adds ``finished_at`` to ``record`` (Redis's clock). A ``failed`` job joins its
        queue's dead set in the same script. ``ack``: the engine's ack of this delivery, done
        in the same script when it writes (runtime/ack.py)."""
        body = {k: v for k, v in record.items() if k != "finished_at"}
        keys = [self.keys.job(env.id), self.keys.result(env.id), self.keys.held(owner), self.keys.events,
                self.keys.dead(env.queue), self.keys.leases(env.queue), self.keys.ready_wake(env.queue)]
        if ack is not None:
            keys += ack.keys
            extra = [ack.kind, *ack.args, "", ""][:3]
        else:
            extra = ["", "", ""]
        done = await self._batch.call(
            "finish", keys,
            [env.id, owner, attempt, status, json.dumps(body, default=str), keep,
             self.events_maxlen, self.dead_ttl, *extra, *_flat(events)],
        )
        return bool(int(done))

    async def requeue(
        self, env: Envelope, owner: str, attempt: int, *, record_attempt: int, delay_ms: int = 0,
        events: Events = (),  # type: ignore[assignment]
    ) -> bool:
        """Put a running attempt back to wait (a retry, a hand-back, a crash recovery), once.
        ``env`` is the envelope of the delivery to come; it is due ``delay_ms`` after Redis's now."""
        raw = env.encode()
        done = await self._batch.call(
            "requeue",
            [self.keys.job(env.id), self.keys.delayed(env.queue), self.keys.held(owner), self.keys.events,
             self.keys.delayed_wake(env.queue), self.keys.leases(env.queue), self.keys.ready_wake(env.queue)],
            [env.id, owner, attempt, record_attempt, raw, max(0, int(delay_ms)), self.events_maxlen,
             *(json.dumps(e) for e in events)],
        )
        return bool(int(done))

    async def lost_job(self, job_id: str) -> dict[str, str] | None:
        """The record of a job, as the reaper needs it."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw.items()}

    async def take_due(self, queue: str, limit: int, lease_ms: int) -> tuple[list[bytes], int | None]:
        """Due entries, leased, as raw bytes (one that is not UTF-8 must not fail the batch),
        and the ms until the next entry left is due (Redis's clock; None: the set is empty)."""
        items, wait = await self._due(keys=[self.keys.delayed(queue)], args=[limit, lease_ms])
        return list(items), (None if int(wait) < 0 else int(wait))

    async def wait_due(self, redis: aioredis.Redis, queue: str, timeout: float, group: str = "") -> str | None:
        """Block (on ``redis``, a connection of the caller's own) up to ``timeout`` seconds for a
        wake-up token of the queue's movers or admitters: ``"delayed"`` (an entry became the
        earliest of the delayed set), ``"ready"`` (a routed job is ready, a lease was freed, the
        queue was resumed), None when none came. One blocking read serves both."""
        found = await redis.blpop([self.keys.delayed_wake(queue), self.keys.ready_wake(queue, group),
                                   self.keys.ready_wake(queue)], timeout=timeout)
        if not found:
            return None
        key = found[0].decode() if isinstance(found[0], bytes) else found[0]
        return "delayed" if key == self.keys.delayed_wake(queue) else "ready"

    async def route(self, queue: str, raws: list[str]) -> int:
        """Put routed envelopes in their ready sets (route.lua) and wake the admitters."""
        if not raws:
            return 0
        return int(await self._route(keys=[self.keys.route(queue)], args=[self.keys.of_queue(queue, ""), *raws]))

    async def admit(
        self, queue: str, instance: str, worker_id: str, engine: str, group: str, labels: str, free: int,
        max_concurrency: int, rate_limits: str, delivery: str,
    ) -> Admitted:
        """Take and claim up to ``free`` routed jobs this worker may start now (admit.lua)."""
        items, wait, state, held = await self._admit(
            keys=[self.keys.held(instance), self.keys.events],
            args=[self.keys.of_queue(queue, ""), self.keys.job(""), queue, instance, worker_id, engine,
                  self.events_maxlen, group, labels, free, max_concurrency, rate_limits, delivery,
                  self.keys.result("")],
        )
        taken = [(items[i], int(items[i + 1]), _text(items[i + 2]), _text(items[i + 3]))
                 for i in range(0, len(items), 4)]
        return Admitted(taken, None if int(wait) < 0 else int(wait), _text(state), int(held))

    async def drop_due(self, queue: str, raws: list[bytes]) -> None:
        if raws:
            await self.redis.zrem(self.keys.delayed(queue), *raws)

    async def drop_poison(
        self, queue: str, raw: bytes, job_id: str, error: str, *, keep: int, engine: str = "", worker_id: str = ""
    ) -> bool:
        """Remove an undecodable delayed entry with a job.failed event (and fail its record
        when the entry was that record's envelope). False when another mover removed it."""
        keys = [self.keys.delayed(queue), self.keys.events, self.keys.job(job_id), self.keys.result(job_id)]
        done = await self._poison(keys=keys, args=[raw, self.events_maxlen, queue, job_id, error, keep, engine,
                                                   worker_id])
        return bool(int(done))


class Admitted(NamedTuple):
    """What one admission pass gave: (envelope, attempt, job id, task) per job taken, the ms
    until a rate-limited task may start again (None: no such wait), the queue's state
    ('' | 'paused' | 'full') and the size of this instance's held set."""

    taken: list[tuple[bytes, int, str, str]]
    wait_ms: int | None
    state: str
    held: int


def _flat(events: Events) -> list[str | int]:
    """Events as finish.lua reads them: per event its field count, then names and values."""
    out: list[str | int] = []
    for event in events:
        out.append(len(event))
        for item in event.items():
            out += item
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_result(redis: aioredis.Redis, keys: Keys, job_id: str) -> dict[str, Any] | None:
    raw = await redis.get(keys.result(job_id))
    return json.loads(raw) if raw else None


async def read_status(redis: aioredis.Redis, keys: Keys, job_id: str) -> str | None:
    status = await redis.hget(keys.job(job_id), "status")
    if status is None:
        return None
    return status.decode() if isinstance(status, bytes) else status
