"""TaskIQ with taskiq-redis's ``RedisStreamBroker``: a Redis Stream per queue, a consumer group.

Native gaps the adapter closes: the consumer group starts at id 0, not taskiq's ``$``,
which loses what was sent before the first worker; acked
entries are deleted (XACK alone keeps them, so the stream grows forever); one read takes
only as many entries as this process has slots (taskiq's 100 piles them onto one consumer);
the group is created at id 0 by whoever starts first (producer or worker);
XAUTOCLAIM's idle time is a day, because crash recovery is the layer's, driven by worker
heartbeats, and a shorter idle time would run long jobs twice. Delays are the layer's.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from taskiq.abc.broker import AckableMessage
from taskiq.acks import AcknowledgeType
from taskiq.message import TaskiqMessage
from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

from app.components.worker.engines.base import EngineAdapter, EngineStats, Handle, keep_running
from app.components.worker.envelope import DISPATCH_NAME
from app.core.redis import connection_kwargs, redis_url

GROUP = "app"
IDLE_TIMEOUT_MS = 24 * 3600 * 1000


def _foreign(reason: str, data: bytes) -> bytes:
    """A stand-in for a message the layer did not write: it reaches the runtime as a
    malformed envelope, so it ends with a job.failed event instead of a log line."""
    return json.dumps({"task_id": uuid.uuid4().hex, "task_name": DISPATCH_NAME, "labels": {},
                       "args": [f"<{reason}: {data[:200]!r}>"], "kwargs": {}}).encode()


class _StreamBroker(RedisStreamBroker):
    """taskiq-redis's stream broker with the layer's fixes: acked entries are deleted,
    a consumer re-reads its own unacked entries first whenever it (re)starts (a consume
    loop that died mid-batch would otherwise strand them), foreign entries are routed to
    the runtime, and XAUTOCLAIM is left to the layer's heartbeat-driven recovery."""

    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        async with Redis(connection_pool=self.connection_pool) as conn:
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
                    data = fields.get(b"data") if fields else None
                    yield AckableMessage(data=self._checked(data, fields), ack=self._ack_generator(entry_id))

    def _checked(self, data: bytes | None, fields: Any) -> bytes:
        if data is None:
            return _foreign("stream entry without a data field", repr(fields).encode())
        try:
            message = json.loads(data)
        except ValueError:
            return _foreign("undecodable taskiq message", data)
        if not isinstance(message, dict) or message.get("task_name") != DISPATCH_NAME:
            return _foreign("foreign taskiq message", data)
        return data
    _acker: Redis | None = None

    def _ack_generator(self, id: str) -> Callable[[], Awaitable[None]]:  # noqa: A002 - taskiq's name
        # One client for every ack: taskiq builds a new Redis object per ack, which costs
        # more CPU than the ack's round trip itself.
        if self._acker is None:
            self._acker = Redis(connection_pool=self.connection_pool)
        acker = self._acker

        async def _ack() -> None:
            async with acker.pipeline(transaction=False) as pipe:
                pipe.xack(self.queue_name, self.consumer_group_name, id)
                pipe.xdel(self.queue_name, id)
                await pipe.execute()

        return _ack


class Adapter(EngineAdapter):
    name = "taskiq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = f"{self.keys.engine_namespace('taskiq')}:{self.config.name}"
        kwargs_ = connection_kwargs(self.settings)
        pool_size = kwargs_.pop("max_connections")
        self.broker = _StreamBroker(
            redis_url(self.settings), queue_name=self.stream, consumer_group_name=GROUP,
            max_connection_pool_size=pool_size, xread_count=self.config.threads, xread_block=1000,
            idle_timeout=IDLE_TIMEOUT_MS, consumer_id="0", **kwargs_,
        )
        self._handle: Handle | None = None
        async def run(raw: str) -> None:
            assert self._handle is not None
            await self._handle(raw)

        self.task = self.broker.register_task(run, task_name=DISPATCH_NAME)
        self._finish = asyncio.Event()
        self._listen: asyncio.Task[None] | None = None

    async def stage(self, pipe: Any, messages: list[tuple[str, str]]) -> None:
        """What the task's kicker sends (a TaskiqMessage through the broker's formatter), as
        XADDs on the layer's pipeline. The consumer group starts at id 0 whenever it is
        created, so entries added before any worker are kept."""
        for message_id, raw in messages:
            message = TaskiqMessage(task_id=message_id, task_name=DISPATCH_NAME, labels={}, labels_types={},
                                    args=[raw], kwargs={})
            pipe.xadd(self.stream, {b"data": self.broker.formatter.dumps(message).message})

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
        """Re-add what the dead consumer read but never acked, then drop its entries."""
        async with Redis(connection_pool=self.broker.connection_pool) as conn:
            pending = await conn.xpending_range(self.stream, GROUP, "-", "+", 10_000, consumername=dead_instance)
            ids = [p["message_id"] for p in pending]
            if not ids:
                return 0
            entries = await conn.xclaim(self.stream, GROUP, self.broker.consumer_name, 0, ids)
            async with conn.pipeline(transaction=True) as pipe:
                for _, fields in entries:
                    if fields:
                        pipe.xadd(self.stream, fields)
                pipe.xack(self.stream, GROUP, *ids)
                pipe.xdel(self.stream, *ids)
                await pipe.execute()
            await conn.xgroup_delconsumer(self.stream, GROUP, dead_instance)
            return len(ids)

    async def stop_fetching(self) -> None:
        self._finish.set()

    async def close(self) -> None:
        if self._listen is not None:
            try:
                await asyncio.wait_for(self._listen, 5)
            except (TimeoutError, Exception):  # noqa: BLE001
                self._listen.cancel()
                await asyncio.gather(self._listen, return_exceptions=True)
        await self.broker.shutdown()
        await self.close_redis()

    async def stats(self) -> EngineStats:
        async with Redis(connection_pool=self.broker.connection_pool) as conn:
            length = await conn.xlen(self.stream)
            try:
                pending = (await conn.xpending(self.stream, GROUP))["pending"]
            except ResponseError:
                pending = 0
        return EngineStats(ready=max(0, length - pending), running=pending, dead=0)
