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
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from app.core.redis_cluster import is_cluster

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
    on a dropped connection like redis-py's own call.

    ``then``: one more command sent right after the script on the same connection (``WAIT``,
    which only counts that connection's writes and cannot run inside a script); the replies
    of both are returned as a pair. On Redis Cluster the call goes to the master serving the
    slot of ``keys[0]`` on one of its connections (``_on_slot_master``), with or without
    ``then``: redis-py's own routing of a script call (Python packing, key extraction) cost
    about 50 us more per single enqueue (bench/wait_cost.py --cluster)."""
    client = script.registered_client
    commands = [("EVALSHA", script.sha, len(keys), *keys, *args)] + ([then] if then is not None else [])
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, aioredis.ConnectionPool):
        conn = await pool.get_connection()
        try:
            replies = await _exchange(conn, script, commands)
        finally:
            await pool.release(conn)
    elif is_cluster(client):
        replies = await _on_slot_master(client, script, commands, keys[0])
    elif then is None:  # another client
        return await script(keys=keys, args=args)
    else:  # another client: its own pipeline
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return tuple(await pipe.execute())
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies[0] if then is None else tuple(replies)


async def _exchange(conn: Any, script: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """``commands`` as one write on ``conn``, every reply read (an error reply too, so none is
    left on the connection); on NOSCRIPT the script is loaded on that same connection (hence
    on the server that refused it) and the commands sent again. A dropped connection is
    retried by its own ``retry``; what that cannot mend is raised."""
    packed = [pack_command(command) for command in commands]

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

    replies = await conn.retry.call_with_retry(once, dropped)
    if any(isinstance(reply, NoScriptError) for reply in replies):

        async def load() -> list[Any]:
            await conn.send_packed_command([pack_command(("SCRIPT", "LOAD", script.script))])
            await conn.read_response()
            return await once()

        replies = await conn.retry.call_with_retry(load, dropped)
    return replies


CLUSTER_TRIES = 4  # tries of the script + WAIT pair on Cluster (each after a fresh look at the slot map)


async def _on_slot_master(client: Any, script: Any, commands: list[tuple[Any, ...]], key: Any) -> list[Any]:
    """Redis Cluster: ``commands`` (the script, then WAIT if asked) on one connection of the
    master that serves ``key``'s slot, as WAIT counts only that connection's writes there.

    redis-py's cluster client routes one command at a time, so the pair goes out here on a
    connection of the slot's ``ClusterNode``, following the client's own redirections: MOVED
    (the slot moved: the slot map is patched the way redis-py does, or reloaded every few
    times) and ASK (the slot is migrating: the pair is sent again to the importing node after
    ASKING), CLUSTERDOWN / TRYAGAIN (a failover or a migration under way: a short pause, then
    the slot map is reloaded), and a connection that stays down after its own retries (the
    map is reloaded, as a replica may have been promoted). A resent script call is recognised
    by its run tokens (flag 2), so trying again never enqueues twice."""
    slot = client.keyslot(key)
    asking: Any = None
    error: Exception | None = None
    for _ in range(CLUSTER_TRIES):
        await client.initialize()  # a no-op unless the slot map was dropped
        node = asking or client.nodes_manager.get_node_from_slot(slot)
        sent = ([("ASKING",)] if asking else []) + commands
        asking = None
        conn = node.acquire_connection()
        try:
            replies = await _exchange(conn, script, sent)
        except (ConnectionError, TimeoutError) as exc:
            error = exc
            await conn.disconnect()
            client.nodes_manager.startup_nodes.pop(node.name, None)  # as redis-py does for a dead node
            await client.aclose()  # the slot map is read again on the next try
            continue
        except BaseException:  # cancelled mid-exchange: replies may be left unread on it
            await conn.disconnect()
            raise
        finally:
            node._free.append(conn)  # ClusterNode's own way to hand a connection back (it checks nothing)
        replies = replies[len(sent) - len(commands):]
        first = replies[0]
        if isinstance(first, MovedError):
            error = first
            client.reinitialize_counter += 1
            if client.reinitialize_steps and client.reinitialize_counter % client.reinitialize_steps == 0:
                client.reinitialize_counter = 0
                await client.aclose()
            else:
                client.nodes_manager._moved_exception = first  # patched on the next get_node_from_slot
        elif isinstance(first, AskError):
            error = first
            asking = client.get_node(host=first.host, port=first.port)
            if asking is None:  # a node the map does not know yet
                await client.aclose()
        elif isinstance(first, (ClusterDownError, TryAgainError)):
            error = first
            await asyncio.sleep(0.25 if isinstance(first, ClusterDownError) else 0.05)
            await client.aclose()
        else:
            return replies
    assert error is not None
    raise error
