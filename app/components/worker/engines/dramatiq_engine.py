"""Dramatiq: a Redis list per queue, worker threads per process, prefetch per consumer.

The layer builds its own ``RedisBroker`` with no default middleware: no Retries (the
runtime retries), no TimeLimit (the runtime times out), no AgeLimit/Callbacks/Pipelines.
The dispatcher actor is sync (Dramatiq runs actors on its threads) and hands each message
to the runtime on the process's event loop, blocking its thread until the job ends, so
``threads`` means the same as on the other engines.

The consumer is the layer's (``_Consumer``): it fetches ids with their data (one script),
so a message it cannot read is reported and acked instead of jamming the consumer or
staying in ``.msgs`` forever; it blocks on the queue's wake-up list when the queue is empty
instead of polling; it takes nothing once the worker stops fetching, and gives back what it
fetched when it closes. The broker id is the layer's instance id, so the messages an
instance fetched are ``<ns>:__acks__.<instance>.<queue>``: the reaper's ``recover`` puts
them back when the instance dies, which replaces Dramatiq's maintenance (turned off: it ran
``KEYS`` on a share of all commands and acted only after its own heartbeat timeout).
Messages a fetch whose reply was lost left in a LIVE instance's acks set go back after the
connection failure (``dramatiq_stranded.py``).
There is no consumer for Dramatiq's delay queue: delays are the layer's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import time
import uuid
from typing import Any

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import CurrentMessage
from redis.exceptions import NoScriptError

from app.components.worker.engines.base import (
    WAKE_TOKENS,
    WAKE_TTL_MS,
    Coalescer,
    EngineAdapter,
    EngineStats,
    Handle,
    stand_in,
)
from app.components.worker.engines.dramatiq_stranded import Stranded, notice_failures
from app.components.worker.envelope import DISPATCH_NAME, new_job_id
from app.components.worker.runtime import scripts
from app.components.worker.runtime.ack import DELIVERY_ACK, EngineAck
from app.core.redis import sync_client

logger = logging.getLogger(__name__)

ACK_SHA = hashlib.sha1(scripts.source("dramatiq_ack").encode()).hexdigest()
STOP_TIMEOUT_MS = 10_000
ACK_WAIT_S = 5.0  # longest a worker thread waits for the loop's batched ack before acking by itself
THREAD_WAIT_MS = 100  # worker threads' wait on the in-process work queue (no Redis calls)
BUSY_WAIT_S = 0.005  # a consumer whose prefetch is full checks again after this (no Redis calls)
PUTBACK_WAIT_S = 10.0  # longest the orphan sweep waits for the consumer thread's put-back (tried again next pass)


_ENCODE = json.encoder.encode_basestring_ascii  # json.dumps of one str, in C


def _encoded(queue: str, raw: str, redis_id: str, message_id: str, timestamp_ms: int) -> bytes:
    """``dramatiq.Message(...).encode()`` of the dispatcher's message with dramatiq's default
    JSON encoder (the same bytes, checked by a test), without the dataclass and the dict: a
    bulk enqueue builds one per job."""
    return (f'{{"queue_name":{_ENCODE(queue)},"actor_name":"{DISPATCH_NAME}","args":[{_ENCODE(raw)}],'
            f'"kwargs":{{}},"options":{{"redis_message_id":{_ENCODE(redis_id)}}},'
            f'"message_id":{_ENCODE(message_id)},"message_timestamp":{timestamp_ms}}}').encode()


def _uuid_text() -> str:
    """``str(uuid.uuid4())``, drawn like the layer's job ids."""
    h = new_job_id()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _Consumer(_RedisConsumer):
    """Dramatiq's Redis consumer, with the layer's fetch, decoding, idle wait and hand-back."""

    def __init__(self, adapter: Adapter, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self.adapter = adapter
        self.message_cache: list[tuple[str, bytes | None]] = []  # type: ignore[assignment]

    def __next__(self) -> MessageProxy | None:
        adapter = self.adapter
        try:
            if not adapter.fetching:  # stopping: what is cached goes back in close()
                time.sleep(THREAD_WAIT_MS / 1000)
                return None
            if self.message_cache:
                redis_id, data = self.message_cache.pop(0)
                message = adapter.decode(redis_id, data)
                self.queued_message_ids.add(message.message_id)
                return MessageProxy(message)
            if adapter.stranded.due:  # here, between fetches: no fetch of this process is under way
                adapter.put_back_stranded()
            free = self.prefetch - self.outstanding_message_count
            if free <= 0:
                time.sleep(BUSY_WAIT_S)
                return None
            fetched = adapter.fetch(free)
            if adapter.consumer.state != "running":
                adapter.consumer.running()  # Dramatiq's ConsumerThread restarted it and Redis answers
            if fetched:
                self.message_cache = fetched
                return self.__next__()
            adapter.wait_for_wake()
            return None
        except redis.RedisError as exc:
            adapter.stranded.notice()  # a fetch's reply may be lost: its messages in our acks set
            adapter.consumer.restarting(exc)  # for the heartbeat; Dramatiq restarts the consumer
            if isinstance(exc, redis.ConnectionError):
                raise ConnectionClosed(exc) from None
            raise

    def ack(self, message: MessageProxy) -> None:
        """Dramatiq's ack, on the process's event loop: the acks of jobs that end together
        share one round trip (``Adapter.ack``) instead of one blocking script call each."""
        redis_id = message.options["redis_message_id"]
        if redis_id in self.adapter.folded:  # finish.lua acked it with the job's end
            self.adapter.folded.discard(redis_id)
            self.adapter.stranded.released([redis_id])
            self.queued_message_ids.discard(message.message_id)
            return
        try:
            self.adapter.ack(redis_id)
            self.adapter.stranded.released([redis_id])  # only once acked: Dramatiq retries a failed ack
        except redis.ConnectionError as e:
            raise ConnectionClosed(e) from None
        finally:
            self.queued_message_ids.discard(message.message_id)

    def nack(self, message: MessageProxy) -> None:
        super().nack(message)
        self.adapter.stranded.released([message.options["redis_message_id"]])

    def requeue(self, messages: Any) -> None:
        """Dramatiq's hand-back of messages no worker thread started (at a stop, or when the
        consumer restarts); not held any more, whether it reached Redis or not."""
        messages = list(messages)
        try:
            super().requeue(messages)
        finally:
            self.adapter.stranded.released(m.options["redis_message_id"] for m in messages)

    def close(self) -> None:
        """Give back what was fetched but not yet handed to a worker thread (Dramatiq's own
        consumer leaves these in its acks set until maintenance finds the process dead)."""
        ids = [redis_id for redis_id, _ in self.message_cache]
        self.message_cache = []
        if ids:
            try:
                self.broker.do_requeue(self.queue_name, *ids)
            except redis.RedisError as exc:  # they stay in the acks set: the next put-back or recover() returns them
                logger.warning("queue %s: requeueing %d fetched message(s) failed (%s)", self.queue_name, len(ids), exc)
            finally:
                self.adapter.stranded.released(ids)


class _Broker(RedisBroker):
    adapter: Adapter

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> _Consumer:
        return _Consumer(self.adapter, self, queue_name, prefetch, timeout)


class _Worker(dramatiq.Worker):
    def _add_consumer(self, queue_name: str, *, delay: bool = False) -> None:
        if not delay:  # the layer never uses Dramatiq's delay queue: no consumer polling it
            super()._add_consumer(queue_name)


class Adapter(EngineAdapter):
    name = "dramatiq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue_name = self.config.name
        self.base = f"{self.namespace}:{self.queue_name}"
        # Every worker thread acks through this client: a pool smaller than the threads makes
        # acks fail with "Too many connections" under load (Dramatiq retries them 5 s later).
        pool = max(self.settings.redis_max_connections, self.config.threads + 8)
        self.broker = _Broker(client=sync_client(self.settings, max_connections=pool), namespace=self.namespace,
                              middleware=[CurrentMessage()], maintenance_chance=0)
        self.folded: set[str] = set()  # messages finish.lua acked with their job's end
        self.stranded = Stranded(self.broker.client, self.queue_name)  # fetched ids held here; the put-back
        notice_failures(self.broker.client, self.stranded.notice)
        self.broker.adapter = self
        self.broker.declare_queue(self.queue_name)
        self._fetch = self.broker.client.register_script(scripts.source("dramatiq_fetch"))
        self._recover = self.broker.client.register_script(scripts.source("dramatiq_recover"))
        self._ack_loaded = False
        self._acks: Coalescer[str] | None = None
        self.fetching = True
        self.instance = self.broker.broker_id
        self._worker: dramatiq.Worker | None = None
        self._handle: Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        dramatiq.Actor(
            self._run, broker=self.broker, actor_name=DISPATCH_NAME, queue_name=self.queue_name,
            priority=0, options={"max_retries": 0},
        )

    def _run(self, raw: str) -> None:
        """The dispatcher actor, on a Dramatiq worker thread."""
        assert self._loop is not None and self._handle is not None
        message = CurrentMessage.get_current_message()
        redis_id = message.options.get("redis_message_id") if message is not None else None
        ack = None
        if isinstance(redis_id, str):
            ack = EngineAck("dramatiq", [self.acks_key(self.instance), f"{self.base}.msgs"], [redis_id])
        future = asyncio.run_coroutine_threadsafe(self._handle_acked(raw, ack), self._loop)
        try:
            future.result()
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            # Cancelled by the shutdown: the job's record says what happens to it (handed
            # back, or recovered); acked here, not failed into Dramatiq's dead-letter queue.
            return
        if ack is not None and ack.done:
            self.folded.add(ack.args[0])

    async def _handle_acked(self, raw: str, ack: EngineAck | None) -> None:
        """The runtime, with this delivery's ack for finish.lua to do (runtime/ack.py)."""
        assert self._handle is not None
        DELIVERY_ACK.set(ack)  # this task's own context
        await self._handle(raw)

    def acks_key(self, instance: str) -> str:
        """Dramatiq's set of the messages one broker (here: one layer instance) fetched."""
        return f"{self.namespace}:__acks__.{instance}.{self.queue_name}"

    @property
    def own_wake_key(self) -> str:
        """Where ``stop_fetching`` wakes this process's consumer out of its idle wait."""
        return f"{self.wake_key}:{self.instance}"

    def fetch(self, count: int) -> list[tuple[str, bytes | None]]:
        """Take up to ``count`` messages (their ids into this instance's acks set)."""
        flat = self._fetch(keys=[self.base, f"{self.base}.msgs", self.acks_key(self.instance)], args=[count])
        fetched = [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]
        self.stranded.fetched(redis_id for redis_id, _ in fetched)
        return fetched

    def put_back_stranded(self) -> int:
        """On the consumer thread, between fetches (dramatiq_stranded.py)."""
        return self.stranded.put_back(self.acks_key(self.instance), self.base, self.wake_key)

    def ack(self, redis_id: str) -> None:
        """Ack one message (from a worker thread): its id joins the next pipeline of acks on the
        event loop (dramatiq_ack.lua, one call per loop turn); returns once it was sent."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            self.broker.do_ack(self.queue_name, redis_id)  # no loop to batch on (stopping): Dramatiq's own ack
            return
        future = asyncio.run_coroutine_threadsafe(self._ack(redis_id), loop)
        try:
            future.result(timeout=ACK_WAIT_S)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            # The loop is stuck or went away meanwhile: never leave a worker thread waiting on it.
            future.cancel()
            self.broker.do_ack(self.queue_name, redis_id)

    async def _ack(self, redis_id: str) -> None:
        if self._acks is None:
            self._acks = Coalescer(lambda: self.redis, self._stage_acks)
        for _ in range(2):
            if not self._ack_loaded:
                await self.redis.script_load(scripts.source("dramatiq_ack"))
                self._ack_loaded = True
            try:
                await self._acks.run(redis_id)
                return
            except NoScriptError:  # Redis restarted without its script cache: load it again
                self._ack_loaded = False
        await self._acks.run(redis_id)

    def _stage_acks(self, pipe: Any, ids: list[str]) -> None:
        # execute_command: redis-py's cluster pipeline refuses .evalsha(), not the command
        pipe.execute_command("EVALSHA", ACK_SHA, 2, self.acks_key(self.instance), f"{self.base}.msgs", *ids)

    def wait_for_wake(self) -> None:
        self.broker.client.blpop([self.wake_key, self.own_wake_key], timeout=self.idle_wait)

    def decode(self, redis_id: str, data: bytes | None) -> dramatiq.Message[Any]:
        """The message for ``redis_id``, rebuilt from its checked fields; anything the layer
        did not write becomes a stand-in that the runtime fails with a job.failed event and
        that is acked like any message (Dramatiq's decoder would raise: no ack, no event)."""
        arg = self._argument(data) if data is not None else stand_in("dramatiq list entry without a message", redis_id)
        try:
            fields = json.loads(data) if data is not None else {}
        except ValueError:
            fields = {}
        message_id = fields.get("message_id") if isinstance(fields, dict) else None
        timestamp = fields.get("message_timestamp") if isinstance(fields, dict) else None
        return dramatiq.Message(
            queue_name=self.queue_name, actor_name=DISPATCH_NAME, args=(arg,), kwargs={},
            options={"redis_message_id": redis_id},
            message_id=message_id if isinstance(message_id, str) and message_id else uuid.uuid4().hex,
            message_timestamp=timestamp if isinstance(timestamp, int) else 0,
        )

    @staticmethod
    def _argument(data: bytes) -> str:
        try:
            message = json.loads(data)
        except ValueError:
            return stand_in("undecodable dramatiq message", data)
        if not isinstance(message, dict):
            return stand_in("dramatiq message that is not an object", data)
        if message.get("actor_name") != DISPATCH_NAME:
            return stand_in(f"foreign dramatiq message for actor {message.get('actor_name')!r}", data)
        args = message.get("args")
        if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], str)) or message.get("kwargs") not in (None, {}):
            return stand_in("dramatiq message whose arguments are not one envelope string", data)
        return args[0]

    async def stage(self, pipe: Any, messages: list[tuple[str, str]]) -> None:
        """What ``RedisBroker.enqueue`` writes (its dispatch script's "enqueue": the message in
        the queue's ``.msgs`` hash, its id pushed on the queue's list), for a whole batch in two
        commands on the layer's async pipeline instead of one blocking script call per message."""
        stored: dict[str, bytes] = {}
        plain = type(dramatiq.get_encoder()) is dramatiq.JSONEncoder
        for message_id, raw in messages:
            redis_id = _uuid_text()
            if plain:
                stored[redis_id] = _encoded(self.queue_name, raw, redis_id, message_id, int(time.time() * 1000))
            else:
                stored[redis_id] = dramatiq.Message(
                    queue_name=self.queue_name, actor_name=DISPATCH_NAME, args=(raw,), kwargs={},
                    options={"redis_message_id": redis_id}, message_id=message_id,
                ).encode()
        pipe.hset(f"{self.base}.msgs", mapping=stored)
        pipe.rpush(self.base, *stored)
        self.stage_wake(pipe, len(messages))

    async def start(self, handle: Handle, instance: str) -> None:
        self._handle = handle
        self._loop = asyncio.get_running_loop()
        self.instance = self.broker.broker_id = instance
        # Without process_boot, Dramatiq middleware that depends on it silently does nothing.
        self.broker.emit_after("process_boot")
        self._worker = _Worker(self.broker, queues={self.queue_name}, worker_threads=self.config.threads,
                               worker_timeout=THREAD_WAIT_MS)
        self._worker.start()

    async def recover(self, dead_instance: str) -> int:
        return int(await asyncio.to_thread(
            self._recover, keys=[self.acks_key(dead_instance), self.base, f"{self.namespace}:__heartbeats__", self.wake_key],
            args=[dead_instance, WAKE_TOKENS, WAKE_TTL_MS],
        ))

    async def redeliver_stranded(self, instance: str, running: set[str]) -> int:
        """After a failover (runtime/orphans.py): messages recorded as fetched by this live
        instance that it never got (the fetch's reply died with the old master) go back on the
        queue. Done by the consumer thread between two fetches (dramatiq_stranded.py), against
        the ids this process holds, so ``running`` is not needed."""
        if self._worker is None or instance != self.instance:
            return 0  # nothing consumes here (a group's worker): nothing was fetched here
        return await asyncio.wait_for(asyncio.wrap_future(self.stranded.request()), PUTBACK_WAIT_S)

    async def stop_fetching(self) -> None:
        # Not ConsumerThread.pause(): a paused consumer thread "restarts" with a 3 s sleep.
        self.fetching = False
        if self._worker is not None:
            # Worker threads take no more prefetched messages: Worker.stop requeues them as
            # they are, instead of each being claimed and handed back by the runtime.
            for thread in self._worker.workers:
                thread.pause()
            try:  # wakes this process's idle consumer at once; without it, it wakes within the idle wait
                await asyncio.to_thread(self.broker.client.lpush, self.own_wake_key, b"1")
            except Exception as exc:  # noqa: BLE001
                logger.warning("could not wake the idle consumer (%s); it stops within the idle wait", exc)

    async def close(self) -> None:
        if self._worker is not None:
            self.fetching = False
            # Stops worker threads, then consumers; the work queue and the consumers' caches
            # go back to the queue. What is left in this instance's acks set then (a requeue
            # that failed) goes back too.
            await asyncio.to_thread(self._worker.stop, STOP_TIMEOUT_MS)
            self._worker = None
            try:
                await self.recover(self.instance)
                await asyncio.to_thread(self.broker.client.delete, self.own_wake_key)
            except redis.RedisError as exc:
                logger.warning("queue %s: could not hand back fetched messages (%s)", self.queue_name, exc)
        self.broker.close()
        await self.close_redis()

    async def stats(self) -> EngineStats:
        client = self.broker.client

        def read() -> list[int]:
            pipe = client.pipeline(transaction=False)
            pipe.llen(self.base)
            pipe.hlen(f"{self.base}.msgs")
            pipe.zcard(f"{self.base}.XQ")
            return pipe.execute()  # type: ignore[no-any-return]

        ready, stored, dead = await asyncio.to_thread(read)
        return EngineStats(ready=ready, running=max(0, stored - ready), dead=dead)
