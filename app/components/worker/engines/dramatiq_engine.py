"""Dramatiq: a Redis list per queue, worker threads per process, prefetch per consumer.

The layer builds its own ``RedisBroker`` with no default middleware: no Retries (the
runtime retries), no TimeLimit (the runtime times out), no AgeLimit/Callbacks/Pipelines.
The dispatcher actor is sync (Dramatiq runs actors on its threads) and hands each message
to the runtime on the process's event loop, blocking its thread until the job ends, so
``threads`` means the same as on the other engines.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.errors import DecodeError

from app.components.worker.engines.base import EngineAdapter, EngineStats, Handle
from app.components.worker.envelope import DISPATCH_NAME
from app.core.redis import sync_client

logger = logging.getLogger(__name__)

STOP_TIMEOUT_MS = 10_000
IDLE_POLL_MS = 8  # the longest an idle consumer sleeps between fetches (Dramatiq's default: 1 s)
MAINTENANCE_CHANCE = 100_000  # out of 1,000,000 commands


class _Encoder(dramatiq.JSONEncoder):
    """Dramatiq's JSON, except that a message the layer did not write (another actor, or
    bytes that are not a message) reaches the runtime as a malformed envelope and ends with
    a job.failed event. Dramatiq itself raises on undecodable bytes, and its consumer then
    drops the rest of its prefetched batch until the process restarts."""

    def __init__(self, queue_name: str) -> None:
        self.queue_name = queue_name

    def decode(self, data: bytes) -> dict[str, Any]:
        try:
            message = super().decode(data)
        except DecodeError:
            message = None
        if isinstance(message, dict) and message.get("actor_name") == DISPATCH_NAME:
            return message
        what = f"for actor {message.get('actor_name')!r}" if isinstance(message, dict) else "that is not JSON"
        return {
            "queue_name": self.queue_name, "actor_name": DISPATCH_NAME,
            "args": [f"<foreign dramatiq message {what}: {data[:200]!r}>"], "kwargs": {},
            "options": (message or {}).get("options", {}), "message_id": uuid.uuid4().hex,
            "message_timestamp": 0,
        }


class Adapter(EngineAdapter):
    name = "dramatiq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue_name = self.config.name
        self.namespace = self.keys.engine_namespace("dramatiq")
        # Messages a dead process fetched but never started come back through Dramatiq's
        # maintenance: make it notice a dead consumer after the layer's offline threshold and
        # run often enough (~10% of commands) to act within about a second.
        self.broker = RedisBroker(
            client=sync_client(self.settings), namespace=self.namespace, middleware=[],
            heartbeat_timeout=int(self.settings.worker_offline_after * 1000), maintenance_chance=MAINTENANCE_CHANCE,
        )
        self.broker.declare_queue(self.queue_name)
        dramatiq.set_encoder(_Encoder(self.queue_name))
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
        future = asyncio.run_coroutine_threadsafe(self._handle(raw), self._loop)
        try:
            future.result()
        except asyncio.CancelledError:
            # The runtime handed the job back during shutdown; ack this delivery.
            return

    async def stage(self, pipe: Any, messages: list[tuple[str, str]]) -> None:
        """What ``RedisBroker.enqueue`` writes (its dispatch script's "enqueue": the message in
        the queue's ``.msgs`` hash, its id pushed on the queue's list), for a whole batch in two
        commands on the layer's async pipeline instead of one blocking script call per message."""
        stored: dict[str, bytes] = {}
        for message_id, raw in messages:
            redis_id = str(uuid.uuid4())
            stored[redis_id] = dramatiq.Message(
                queue_name=self.queue_name, actor_name=DISPATCH_NAME, args=(raw,), kwargs={},
                options={"redis_message_id": redis_id}, message_id=message_id,
            ).encode()
        base = f"{self.namespace}:{self.queue_name}"
        pipe.hset(f"{base}.msgs", mapping=stored)
        pipe.rpush(base, *stored)

    async def start(self, handle: Handle, instance: str) -> None:
        self._handle = handle
        self._loop = asyncio.get_running_loop()
        # Without process_boot, Dramatiq middleware that depends on it silently does nothing.
        self.broker.emit_after("process_boot")
        self._worker = dramatiq.Worker(
            self.broker, queues={self.queue_name}, worker_threads=self.config.threads, worker_timeout=max(1, int(self.settings.worker_idle_poll_ms or IDLE_POLL_MS)),
        )
        self._worker.start()

    async def stop_fetching(self) -> None:
        if self._worker is not None:
            for consumer in self._worker.consumers.values():
                consumer.pause()

    async def close(self) -> None:
        if self._worker is not None:
            # Stops worker threads, then consumers, which requeue what they prefetched.
            await asyncio.to_thread(self._worker.stop, STOP_TIMEOUT_MS)
            self._worker = None
        self.broker.close()
        await self.close_redis()

    async def stats(self) -> EngineStats:
        client = self.broker.client
        base = f"{self.namespace}:{self.queue_name}"

        def read() -> list[int]:
            pipe = client.pipeline(transaction=False)
            pipe.llen(base)
            pipe.hlen(f"{base}.msgs")
            pipe.zcard(f"{base}.XQ")
            return pipe.execute()  # type: ignore[no-any-return]

        ready, stored, dead = await asyncio.to_thread(read)
        return EngineStats(ready=ready, running=max(0, stored - ready), dead=dead)
