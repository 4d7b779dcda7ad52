"""TaskIQ with taskiq-redis's ``RedisStreamBroker``: a Redis Stream per queue, a consumer group.

Native gaps the adapter closes: the consumer group starts at id 0, not taskiq's ``$``,
which loses what was sent before the first worker; acked
entries are deleted (XACK alone keeps them, so the stream grows forever); one read takes
only as many entries as this process has slots (taskiq's 100 piles them onto one consumer);
the group is created at id 0 by whoever starts first (producer or worker);
XAUTOCLAIM's idle time is a day, because crash recovery is the layer's, driven by worker
heartbeats, and a shorter idle time would run long jobs twice. Delays are the layer's.
A stopping worker re-adds the entries it read and did not run (taskiq drops a batch that
was read but not handed out, and a read cut short by the stop) and leaves the group; the
reaper does the same for a dead one. Entries the layer did not write end with job.failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from taskiq.abc.broker import AckableMessage
from taskiq.acks import AcknowledgeType
from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

from app.components.worker.engines.base import Coalescer, EngineAdapter, EngineStats, Handle, keep_running, stand_in
from app.components.worker.envelope import DISPATCH_NAME
from app.components.worker.runtime.ack import DELIVERY_ACK, EngineAck
from app.core.redis import async_pool, connection_kwargs, redis_url
from app.core.redis_cluster import transactional

logger = logging.getLogger(__name__)

GROUP = "app"
IDLE_TIMEOUT_MS = 24 * 3600 * 1000


def _message(arg: str, task_id: str | None = None) -> bytes:
    return json.dumps({"task_id": task_id or uuid.uuid4().hex, "task_name": DISPATCH_NAME, "labels": {},
                       "labels_types": None, "args": [arg], "kwargs": {}}).encode()


_ENCODE = json.encoder.encode_basestring_ascii  # json.dumps of one str, in C


def _sent(message_id: str, raw: str) -> bytes:
    """What taskiq's formatter writes for the dispatcher's message (``TaskiqMessage`` through
    its JSON serializer: the same bytes, checked by a test), built without pydantic: a bulk
    enqueue builds one per job."""
    return (f'{{"task_id": {_ENCODE(message_id)}, "task_name": "{DISPATCH_NAME}", "labels": {{}}, '
            f'"labels_types": {{}}, "args": [{_ENCODE(raw)}], "kwargs": {{}}}}').encode()


def _checked(data: bytes | None, fields: Any) -> tuple[bytes, str]:
    """The entry's message if the layer wrote it, and its envelope; otherwise a stand-in for
    the runtime, which fails it with a job.failed event, after which the entry is acked and
    deleted like any other. taskiq's receiver would log and skip a message it cannot parse
    without acking it (pending forever), or call the dispatcher with the wrong arguments
    (acked, no event)."""
    if data is None:
        return _standing_in("stream entry without a data field", repr(fields))
    try:
        message = json.loads(data)
    except ValueError:
        return _standing_in("undecodable taskiq message", data)
    if not isinstance(message, dict) or message.get("task_name") != DISPATCH_NAME:
        what = repr(message.get("task_name")) if isinstance(message, dict) else "that is not an object"
        return _standing_in(f"foreign taskiq message {what}", data)
    args, task_id = message.get("args"), message.get("task_id")
    if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], str)) or message.get("kwargs") not in (None, {}):
        return _standing_in("taskiq message whose arguments are not one envelope string", data)
    if isinstance(task_id, str) and message.get("labels") == {} and message.get("labels_types") in (None, {}) and \
            message.get("kwargs") == {} and len(message) <= 6:
        return data, args[0]
    # labels could steer taskiq: dropped
    return _message(args[0], task_id if isinstance(task_id, str) else None), args[0]


def _standing_in(reason: str, data: Any) -> tuple[bytes, str]:
    arg = stand_in(reason, data)
    return _message(arg), arg


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _StreamBroker(RedisStreamBroker):
    """taskiq-redis's stream broker with the layer's fixes: acked entries are deleted,
    a consumer re-reads its own unacked entries first whenever it (re)starts (a consume
    loop that died mid-batch would otherwise strand them), foreign entries are routed to
    the runtime, and XAUTOCLAIM is left to the layer's heartbeat-driven recovery."""

    shared: Any = None  # Redis Cluster: the one cluster client every command goes through

    def conn(self) -> Any:
        """A client on the broker's pool (closed after use), or the shared cluster client
        (``REDIS_CLUSTER``: taskiq's pool is single-node; the stream is in its queue's slot)."""
        if self.shared is not None:
            return contextlib.nullcontext(self.shared)  # kept open: closed in shutdown()
        return Redis(connection_pool=self.connection_pool)

    async def _declare_consumer_group(self) -> None:
        if self.shared is None:
            await super()._declare_consumer_group()
            return
        try:
            await self.shared.xgroup_create(self.queue_name, self.consumer_group_name, id=self.consumer_id,
                                            mkstream=self.mkstream)
        except ResponseError as err:
            logger.debug(err)

    async def shutdown(self) -> None:
        await super().shutdown()
        if self.shared is not None:
            await self.shared.aclose()

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        async with self.conn() as conn:
            start = "0"  # this consumer's pending entries first, then new ones
            while True:
                fetched = await conn.xreadgroup(
                    self.consumer_group_name, self.consumer_name, {self.queue_name: start},
                    block=self.block, count=self.count,
                )
                entries = [entry for _, batch in fetched for entry in batch]
                if start == "0" and not entries:
                    start = ">"
                    continue
                for entry_id, fields in entries:
                    if start == "0":
                        start = entry_id  # keep paging through the pending list
                    data, arg = _checked(fields.get(b"data") if fields else None, fields)
                    self.entries.setdefault(arg, []).append(_text(entry_id))
                    yield AckableMessage(data=data, ack=self._ack_generator(entry_id))

    _acks: Coalescer[str] | None = None
    entries: dict[str, list[str]]  # envelope -> ids of the entries read with it, not yet handled
    folded: set[str]  # entries finish.lua acked with their job's end: their own ack is skipped

    def take_entry(self, arg: str) -> str | None:
        """The stream entry a delivery of ``arg`` was read from (the oldest one not handled)."""
        ids = self.entries.get(arg)
        if not ids:
            return None
        entry = ids.pop(0)
        if not ids:
            del self.entries[arg]
        return entry

    def _ack_generator(self, id: str) -> Callable[[], Awaitable[None]]:  # noqa: A002 - taskiq's name
        # One client for every ack (taskiq builds a new Redis object per ack, which costs more
        # CPU than the ack's round trip itself), and the acks of jobs that end in the same
        # loop turn share one XACK and one XDEL.
        if self._acks is None:
            acker = self.shared or Redis(connection_pool=self.connection_pool)

            def stage(pipe: Any, ids: list[str]) -> None:
                pipe.xack(self.queue_name, self.consumer_group_name, *ids)
                pipe.xdel(self.queue_name, *ids)

            self._acks = Coalescer(lambda: acker, stage)
        acks = self._acks

        async def _ack() -> None:
            if _text(id) in self.folded:
                self.folded.discard(_text(id))
                return
            await acks.run(id)

        return _ack


class Adapter(EngineAdapter):
    name = "taskiq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = f"{self.namespace}:{self.config.name}"
        kwargs_ = connection_kwargs(self.settings)
        pool_size = kwargs_.pop("max_connections")
        self.broker = _StreamBroker(
            redis_url(self.settings), queue_name=self.stream, consumer_group_name=GROUP,
            max_connection_pool_size=pool_size, xread_count=self.config.threads, xread_block=int(self.idle_wait * 1000),
            idle_timeout=IDLE_TIMEOUT_MS, consumer_id="0", **kwargs_,
        )
        self.broker.connection_pool = async_pool(self.settings, blocking=True, max_connections=pool_size)  # Sentinel too
        self.broker.entries, self.broker.folded = {}, set()
        if self.settings.redis_cluster:
            from app.core.redis import async_client

            self.broker.shared = async_client(self.settings)
        self._handle: Handle | None = None

        async def run(raw: str) -> None:
            assert self._handle is not None
            entry = self.broker.take_entry(raw)
            if entry is None:
                await self._handle(raw)
                return
            ack = EngineAck("taskiq", [self.stream], [entry, GROUP])
            token = DELIVERY_ACK.set(ack)
            try:
                await self._handle(raw)
            finally:
                DELIVERY_ACK.reset(token)
            if ack.done:  # finish.lua acked and deleted the entry with the job's end
                self.broker.folded.add(entry)

        self.task = self.broker.register_task(run, task_name=DISPATCH_NAME)
        self._finish = asyncio.Event()
        self._listen: asyncio.Task[None] | None = None

    async def stage(self, pipe: Any, messages: list[tuple[str, str]]) -> None:
        """What the task's kicker sends (a TaskiqMessage through the broker's formatter), as
        XADDs on the layer's pipeline. The consumer group starts at id 0 whenever it is
        created, so entries added before any worker are kept."""
        for message_id, raw in messages:
            pipe.xadd(self.stream, {b"data": _sent(message_id, raw)})

    async def start(self, handle: Handle, instance: str) -> None:
        self._handle = handle
        self.broker.is_worker_process = True
        self.broker.consumer_name = instance
        receiver = Receiver(
            self.broker, validate_params=False, max_async_tasks=self.config.threads, max_prefetch=0,
            propagate_exceptions=False, run_startup=True, ack_type=AcknowledgeType.WHEN_SAVED,
            wait_tasks_timeout=self.settings.worker_shutdown_timeout,
        )
        self._listen = asyncio.create_task(
            keep_running("taskiq", lambda: receiver.listen(self._finish), self._finish.is_set, self.consumer),
            name="taskiq-receiver",
        )

    async def recover(self, dead_instance: str) -> int:
        """Re-add what a consumer read but never acked, drop its entries, and remove the
        consumer from the group (which otherwise keeps one consumer per worker life)."""
        returned = 0
        async with self.broker.conn() as conn:
            try:
                while True:
                    pending = await conn.xpending_range(self.stream, GROUP, "-", "+", 1000, consumername=dead_instance)
                    ids = [p["message_id"] for p in pending]
                    if not ids:
                        break
                    entries = await conn.xclaim(self.stream, GROUP, dead_instance, 0, ids)
                    async with conn.pipeline(transaction=transactional(conn)) as pipe:
                        for _, fields in entries:
                            if fields:
                                pipe.xadd(self.stream, fields)
                        pipe.xack(self.stream, GROUP, *ids)
                        pipe.xdel(self.stream, *ids)
                        await pipe.execute()
                    returned += len(ids)
                await conn.xgroup_delconsumer(self.stream, GROUP, dead_instance)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
        return returned

    async def redeliver_stranded(self, instance: str, running: set[str]) -> int:
        """After a failover (runtime/orphans.py): entries recorded as read by this live consumer
        that it never got (the read's reply died with the old master) or never started are
        pending here forever (its reads are not retried from 0, and XAUTOCLAIM is off). Re-add the pending entries that it is neither
        running nor holding unstarted; a copy of a delivery that is in fact under way is
        refused by its claim, so this is safe, if at-least-once."""
        waiting = {entry for ids in self.broker.entries.values() for entry in ids}
        async with self.broker.conn() as conn:
            pending = await conn.xpending_range(self.stream, GROUP, "-", "+", 1000, consumername=instance)
            ids = [p["message_id"] for p in pending if _text(p["message_id"]) not in waiting]
            stranded = []
            async with conn.pipeline(transaction=False) as pipe:
                for entry_id in ids:
                    pipe.xrange(self.stream, entry_id, entry_id)
                found = [entry for entries in (await pipe.execute() if ids else []) for entry in entries]
            for entry_id, fields in found:
                if not fields:
                    continue
                try:
                    job_id = json.loads(fields[b"data"])["task_id"].rsplit(".", 2)[0]
                except (KeyError, ValueError, TypeError, AttributeError):
                    job_id = ""
                if job_id not in running:
                    stranded.append((entry_id, fields))
            if stranded:
                async with conn.pipeline(transaction=transactional(conn)) as pipe:
                    for _, fields in stranded:
                        pipe.xadd(self.stream, fields)
                    pipe.xack(self.stream, GROUP, *[entry_id for entry_id, _ in stranded])
                    pipe.xdel(self.stream, *[entry_id for entry_id, _ in stranded])
                    await pipe.execute()
        return len(stranded)

    async def stop_fetching(self) -> None:
        self._finish.set()

    async def close(self) -> None:
        if self._listen is not None:
            try:
                await asyncio.wait_for(self._listen, 5)
            except (TimeoutError, Exception):  # noqa: BLE001
                self._listen.cancel()
                await asyncio.gather(self._listen, return_exceptions=True)
            # Entries read and not acked (a batch not yet handed out, a read cut short by the
            # stop, a delivery the receiver discarded) go back; then the consumer leaves the group.
            try:
                returned = await self.recover(self.broker.consumer_name)
                if returned:
                    logger.info("queue %s: %d fetched message(s) handed back", self.config.name, returned)
            except RedisError as exc:
                logger.warning("queue %s: could not hand back fetched messages (%s)", self.config.name, exc)
        await self.broker.shutdown()
        await self.close_redis()

    async def stats(self) -> EngineStats:
        async with self.broker.conn() as conn:
            length = await conn.xlen(self.stream)
            try:
                pending = (await conn.xpending(self.stream, GROUP))["pending"]
            except ResponseError:
                pending = 0
        return EngineStats(ready=max(0, length - pending), running=pending, dead=0)
