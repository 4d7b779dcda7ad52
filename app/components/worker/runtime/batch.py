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
from hiredis import pack_command
from redis.exceptions import NoScriptError, ResponseError

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
        self._idle: list[Any] = []  # connections of the batcher's own, between flushes

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self.submit(name, keys, args)

    def submit(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue a call for the next flush; the future gets its reply (or its error). A caller
        that must not lose the reply to its own cancellation shields this future: no task needed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((name, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._spawn_flush)
        return future

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
            pool = getattr(self.redis, "connection_pool", None)
            if isinstance(pool, aioredis.ConnectionPool):
                replies = await self._send(pool, batch)
            else:  # another client (a cluster's): its own pipeline
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

    async def _send(self, pool: aioredis.ConnectionPool, batch: list[Call]) -> list[Any]:
        """The batch as one write on a connection of the batcher's own, packed by hiredis (C)
        instead of redis-py's pipeline, whose Python packing, per-command bookkeeping and pool
        check-out (a readability probe of the socket each time) cost more worker CPU than the
        scripts' own work. Same retry on a dropped connection as the pipeline; an error reply
        is that caller's alone. A connection goes back to the batcher only after every reply
        of its batch was read, so no reply can be left on it for the next batch."""
        packed = [pack_command(("EVALSHA", self.shas[name], len(keys), *keys, *args)) for name, keys, args, _ in batch]
        conn = self._idle.pop() if self._idle else await pool.get_connection()

        async def once() -> list[Any]:
            await conn.send_packed_command(packed)
            replies: list[Any] = []
            for _ in packed:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies

        async def dropped(_: BaseException) -> None:
            await conn.disconnect()

        try:
            replies = await conn.retry.call_with_retry(once, dropped)
        except BaseException:
            await conn.disconnect()
            await pool.release(conn)
            raise
        self._idle.append(conn)
        return replies


async def call_script(script: Any, keys: list[Any], args: list[Any], *, then: tuple[Any, ...] | None = None) -> Any:
    """One call of a script registered on an asyncio client (``register_script``), packed by
    hiredis: for a call of many arguments (a bulk enqueue) redis-py's packing costs more than
    the script's own run in Redis. Loads the script on NOSCRIPT (a Redis restart) and retries
    on a dropped connection like redis-py's own call; any other client (a cluster's) calls the
    script through a pipeline.

    ``then``: one more command sent right after the script on the same connection (``WAIT``,
    which only counts that connection's writes and cannot run inside a script); the replies
    of both are returned as a pair."""
    client = script.registered_client
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, aioredis.ConnectionPool):
        if then is None:
            return await script(keys=keys, args=args)
        async with client.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)  # a cluster pipeline refuses .evalsha()
            pipe.execute_command(*then)
            return tuple(await pipe.execute())
    commands = [("EVALSHA", script.sha, len(keys), *keys, *args)] + ([then] if then is not None else [])
    packed = [pack_command(command) for command in commands]
    conn = await pool.get_connection()

    async def once() -> list[Any]:
        await conn.send_packed_command(packed)
        replies: list[Any] = []
        for _ in packed:  # every reply is read, an error one too, so none is left on the connection
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def dropped(_: BaseException) -> None:
        await conn.disconnect()

    try:
        replies = await conn.retry.call_with_retry(once, dropped)
        if isinstance(replies[0], NoScriptError):
            await client.script_load(script.script)
            replies = await conn.retry.call_with_retry(once, dropped)
    finally:
        await pool.release(conn)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies[0] if then is None else tuple(replies)
