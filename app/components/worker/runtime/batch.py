"""Script calls issued in the same event-loop turn go to Redis in one pipeline.

With N job slots, several jobs claim or finish at nearly the same moment; sending their
scripts together costs one socket write and one wake-up instead of N. Each caller still
gets its own reply (or its own error, which its retry loop handles). The scripts are
compare-and-set, so a batch retried after a lost reply changes nothing twice.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

Call = tuple[str, list[str], list[Any], "asyncio.Future[Any]"]
MAX_DEFER = 4  # loop iterations a flush waits at most for other ready callbacks (asyncio's ready queue)


class ScriptBatcher:
    def __init__(self, redis: aioredis.Redis, sources: dict[str, str]) -> None:
        self.redis = redis
        self.sources = sources
        self.shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in sources.items()}
        self._pending: list[Call] = []
        self._scheduled = False
        self._deferred = 0
        self.max_defer = MAX_DEFER
        self._loaded = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((name, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._spawn_flush)
        return await future

    def _spawn_flush(self) -> None:
        # While other callbacks are ready to run (replies just read, jobs just resumed), wait
        # for them: they often end in a claim or a finish of their own, which then joins this
        # pipeline. One send costs the worker about as much CPU as a job's own Python (a
        # loopback TCP send runs Redis's side of the socket too), so fewer, larger pipelines
        # are the cheapest gain; an idle loop flushes at once, so a lone job waits for nothing.
        loop = asyncio.get_running_loop()
        if getattr(loop, "_ready", None) and self._deferred < self.max_defer:
            self._deferred += 1
            loop.call_soon(self._spawn_flush)
            return
        self._deferred = 0
        task = asyncio.ensure_future(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self) -> None:
        for source in self.sources.values():
            await self.redis.script_load(source)
        self._loaded = True

    async def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        try:
            if not self._loaded:
                await self._load()
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, keys, args, _ in batch:
                    # execute_command: redis-py's cluster pipeline refuses .evalsha(), not the command
                    pipe.execute_command("EVALSHA", self.shas[name], len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - every caller gets the error and retries
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                self._loaded = False  # Redis restarted without its script cache: reload next time
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
