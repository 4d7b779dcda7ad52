"""Delays and retry backoff, the same on every engine.

A delayed job (``delay=``, or a retry waiting out its backoff) waits in the layer's sorted
set ``<prefix>:delayed:<queue>``, not in an engine or in a worker's memory, so a crash
cannot strand it and TaskIQ's stream broker, which has no delay, behaves like the others.
Every worker process of the queue runs a mover that hands due jobs to its engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from app.components.worker.envelope import Envelope
from app.components.worker.runtime.store import JobStore

logger = logging.getLogger(__name__)

Send = Callable[[list[tuple[str, str]]], Awaitable[None]]

LEASE_MS = 30_000
BATCH = 200


class DelayedMover:
    def __init__(self, store: JobStore, queue: str, send: Send, poll: float) -> None:
        self.store = store
        self.queue = queue
        self.send = send
        self.poll = poll
        self.moved = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"delayed-mover-{self.queue}")

    async def move_due(self) -> int:
        raws = await self.store.take_due(self.queue, BATCH, LEASE_MS)
        if not raws:
            return 0
        messages = []
        for raw in raws:
            try:
                messages.append((Envelope.decode(raw).message_id, raw))
            except ValueError as exc:
                logger.error("queue %s: malformed delayed entry removed (%s): %.200s", self.queue, exc, raw)
        if messages:
            await self.send(messages)
        await self.store.drop_due(self.queue, raws)
        self.moved += len(messages)
        return len(raws)

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            try:
                moved = await self.move_due()
                backoff = 1.0
                if moved < BATCH:
                    await asyncio.sleep(self.poll)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep moving once Redis is back
                logger.warning("queue %s: moving delayed jobs failed (%s); retry in %.1fs", self.queue, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
