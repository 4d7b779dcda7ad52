"""Delays and retry backoff, the same on every engine.

A delayed job (``delay=``, or a retry waiting out its backoff) waits in the layer's sorted
set ``<prefix>:delayed:<queue>``, not in an engine or in a worker's memory, so a crash
cannot strand it and TaskIQ's stream broker, which has no delay, behaves like the others.
Every worker process of the queue runs a mover that hands due jobs to its engine.
"Due" is judged by Redis's clock, the one every due time is written with.

An entry that cannot be decoded (not UTF-8, not an envelope) is poison: left in place at the
lowest score it would come back first on every pass and trap the jobs behind it. It is
removed with a ``job.failed`` event (``MalformedMessage``, with the job id when one can be
read), and the rest move on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from app.components.worker.envelope import Envelope, recover_id
from app.components.worker.runtime.store import JobStore

logger = logging.getLogger(__name__)

Send = Callable[[list[tuple[str, str]]], Awaitable[None]]

LEASE_MS = 30_000
BATCH = 200
POISON_KEEP_S = 24 * 3600  # how long the failed record of a poisoned job stays readable


def _job_id_of(raw: bytes) -> str:
    """The job id an undecodable entry names, if one can be read (the same reading as the
    runtime's for undecodable deliveries)."""
    found = recover_id(raw.decode("utf-8", errors="replace"))
    if found is None or "\ufffd" in found.job_id or not found.job_id.isprintable():
        return ""
    return found.job_id


class DelayedMover:
    def __init__(
        self, store: JobStore, queue: str, send: Send, poll: float, *, engine: str = "", worker_id: str = "",
        keep: int = POISON_KEEP_S,
    ) -> None:
        self.store = store
        self.queue = queue
        self.send = send
        self.poll = poll
        self.engine = engine
        self.worker_id = worker_id
        self.keep = keep
        self.moved = 0
        self.poisoned = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"delayed-mover-{self.queue}")

    async def move_due(self) -> int:
        raws = await self.store.take_due(self.queue, BATCH, LEASE_MS)
        if not raws:
            return 0
        messages, sent = [], []
        for raw in raws:
            try:
                text = raw.decode() if isinstance(raw, bytes) else raw
                messages.append((Envelope.decode(text).message_id, text))
                sent.append(raw)
            except (ValueError, TypeError, RecursionError) as exc:
                await self._poison(raw if isinstance(raw, bytes) else raw.encode(), exc)
        if messages:
            await self.send(messages)
        await self.store.drop_due(self.queue, sent)
        self.moved += len(messages)
        return len(raws)

    async def _poison(self, raw: bytes, exc: BaseException) -> None:
        job_id = _job_id_of(raw)
        reason = f"undecodable delayed entry ({type(exc).__name__}: {exc}): {raw[:200]!r}"
        if await self.store.drop_poison(self.queue, raw, job_id, reason, keep=self.keep, engine=self.engine,
                                        worker_id=self.worker_id):
            self.poisoned += 1
            logger.error("queue %s: %s removed, with a job.failed event%s", self.queue, reason,
                         f" for job {job_id}" if job_id else "")

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
