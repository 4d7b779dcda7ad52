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
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from taskiq.acks import AcknowledgeType
from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

from app.core.redis import connection_kwargs, redis_url
from app.components.worker.envelope import DISPATCH_NAME
from app.components.worker.engines.base import EngineAdapter, EngineStats, Handle, keep_running

GROUP = "app"
IDLE_TIMEOUT_MS = 24 * 3600 * 1000


class _StreamBroker(RedisStreamBroker):
    def _ack_generator(self, id: str) -> Callable[[], Awaitable[None]]:  # noqa: A002 - taskiq's name
        async def _ack() -> None:
            async with Redis(connection_pool=self.connection_pool) as conn:
                async with conn.pipeline(transaction=False) as pipe:
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
        self._started = False

    async def send(self, messages: list[tuple[str, str]]) -> None:
        if not self._started:
            await self.broker.startup()
            self._started = True
        for message_id, raw in messages:
            await self.task.kicker().with_task_id(message_id).kiq(raw)

    async def start(self, handle: Handle, instance: str) -> None:
        self._handle = handle
        self.broker.is_worker_process = True
        self.broker.consumer_name = instance
        receiver = Receiver(
            self.broker, validate_params=False, max_async_tasks=self.config.threads, max_prefetch=0,
            propagate_exceptions=False, run_startup=True, ack_type=AcknowledgeType.WHEN_SAVED,
            wait_tasks_timeout=self.settings.worker_shutdown_timeout,
        )
        self._started = True
        self._listen = asyncio.create_task(
            keep_running("taskiq", lambda: receiver.listen(self._finish), self._finish.is_set), name="taskiq-receiver"
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
                for entry_id, fields in entries:
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
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                self._listen.cancel()
                await asyncio.gather(self._listen, return_exceptions=True)
        await self.broker.shutdown()

    async def stats(self) -> EngineStats:
        async with Redis(connection_pool=self.broker.connection_pool) as conn:
            length = await conn.xlen(self.stream)
            try:
                pending = (await conn.xpending(self.stream, GROUP))["pending"]
            except ResponseError:
                pending = 0
        return EngineStats(ready=max(0, length - pending), running=pending, dead=0)
