"""arq: a sorted set per queue, async slots per process, polled.

Native behaviour the layer neutralises: pickle (JSON serializers on pool and worker),
arq's own tries and result keys (tries set very high, ``keep_result=0``: the runtime owns
both), per-job INFO logs (``log_results=False``, logger quietened).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as aioredis
from arq import Worker
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from arq.worker import func

from app.components.worker.engines.base import EngineAdapter, EngineStats, Handle, keep_running
from app.components.worker.envelope import DISPATCH_NAME, now_ms
from app.core.redis import connection_kwargs, redis_url

POLL_DELAY = 0.005  # arq's default 0.5 s caps a worker at ~200 jobs/s and adds up to 500 ms of pickup latency
NATIVE_TRIES = 1_000_000
EXPIRES_EXTRA_MS = 7 * 24 * 3600 * 1000


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _loads(data: bytes) -> Any:
    """JSON, and a job the layer did not write reaches the runtime as a malformed envelope
    (ending with a job.failed event) instead of arq's 'function not found' log line."""
    try:
        job = json.loads(data)
        if isinstance(job, dict) and job.get("f") == DISPATCH_NAME:
            return job
        reason = f"foreign arq job for function {job.get('f')!r}" if isinstance(job, dict) else "not an arq job"
    except ValueError:
        reason = "undecodable arq job"
    return {"t": 1, "f": DISPATCH_NAME, "a": [f"<{reason}: {data[:200]!r}>"], "k": {}, "et": now_ms()}


class Adapter(EngineAdapter):
    name = "arq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue_key = f"{self.keys.engine_namespace('arq')}:{self.config.name}"
        self._pool: ArqRedis | None = None
        self._worker: Worker | None = None
        self._main: asyncio.Task[None] | None = None

    @property
    def pool(self) -> ArqRedis:
        if self._pool is None:
            connection_pool = aioredis.ConnectionPool.from_url(redis_url(self.settings), **connection_kwargs(self.settings))
            self._pool = ArqRedis(
                connection_pool, job_serializer=_dumps, job_deserializer=_loads,
                default_queue_name=self.queue_key, expires_extra_ms=EXPIRES_EXTRA_MS,
            )
        return self._pool

    async def stage(self, pipe: Any, messages: list[tuple[str, str]]) -> None:
        """What ``ArqRedis.enqueue_job`` writes (job key, then the queue's sorted set), without
        its WATCH round trips: the layer's own record already refuses duplicate ids."""
        now = now_ms()
        for message_id, raw in messages:
            job = serialize_job(DISPATCH_NAME, (raw,), {}, None, now, serializer=_dumps)
            pipe.psetex(job_key_prefix + message_id, EXPIRES_EXTRA_MS, job)
        pipe.zadd(self.queue_key, {message_id: now for message_id, _ in messages})

    async def start(self, handle: Handle, instance: str) -> None:
        async def run(ctx: dict[str, Any], raw: str) -> None:
            await handle(raw)

        self._worker = Worker(
            functions=[func(run, name=DISPATCH_NAME, max_tries=NATIVE_TRIES)],
            queue_name=self.queue_key,
            redis_pool=self.pool,
            max_jobs=self.config.threads,
            # The runtime enforces the job's own timeout; arq's is only a backstop.
            job_timeout=self.config.timeout + self.settings.worker_shutdown_timeout + 60,
            keep_result=0,
            max_tries=NATIVE_TRIES,
            poll_delay=(self.settings.worker_idle_poll_ms or POLL_DELAY * 1000) / 1000,
            handle_signals=False,
            job_serializer=_dumps,
            job_deserializer=_loads,
            health_check_interval=60,
            log_results=False,
            expires_extra_ms=EXPIRES_EXTRA_MS,
        )
        worker = self._worker
        self._main = asyncio.create_task(
            keep_running("arq", worker.async_run, lambda: not worker.allow_pick_jobs, self.consumer),
            name="arq-worker",
        )

    async def stop_fetching(self) -> None:
        if self._worker is not None:
            self._worker.allow_pick_jobs = False

    async def close(self) -> None:
        if self._main is not None:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        if self._worker is not None:
            tasks = [t for t in self._worker.tasks.values() if not t.done()]
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._pool is not None:
            await self._pool.aclose(close_connection_pool=True)
            self._pool = None
        await self.close_redis()

    async def stats(self) -> EngineStats:
        now = now_ms()
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.zcount(self.queue_key, "-inf", now)
            pipe.zrange(self.queue_key, 0, -1)
            ready_and_running, ids = await pipe.execute()
        running = 0
        if ids:
            running = sum(await asyncio.gather(*(self.pool.exists(in_progress_key_prefix + i.decode()) for i in ids)))
        return EngineStats(ready=max(0, ready_and_running - running), running=running, dead=0)
