"""Delays and retry backoff, the same on every engine.

A delayed job (``delay=``, or a retry waiting out its backoff) waits in the layer's sorted
set ``<prefix>:delayed:<queue>``, not in an engine or in a worker's memory, so a crash
cannot strand it and TaskIQ's stream broker, which has no delay, behaves like the others.
Every worker process of the queue runs a mover that hands due jobs to its engine.
"Due" is judged by Redis's clock, the one every due time is written with.

An idle mover does not poll. Each pass (due.lua) also says how long until the earliest entry
left is due; the mover sleeps that long on its own host's monotonic clock (a duration, so host
clock skew does not matter), or until a wake-up token arrives on ``<prefix>:delayed-wake:<queue>``:
whatever makes an entry the earliest of the set (a delayed enqueue, a retry, a hand-back, a
recovery) pushes one, and a listener blocked on that list (BLPOP, on a connection of its own)
wakes the mover. It checks the set at least every ``poll`` seconds anyway
(``WORKER_DELAY_POLL_SECONDS``), for entries written without a token. A pass that moved a full
batch is followed by the next one at once. BLPOP is not the timer: Redis rounds blocking
timeouts to its 100 ms cron, which would make due jobs late.

An entry that cannot be decoded (not UTF-8, not an envelope) is poison: left in place at the
lowest score it would come back first on every pass and trap the jobs behind it. It is
removed with a ``job.failed`` event (``MalformedMessage``, with the job id when one can be
read), and the rest move on.

A stop lets the pass under way end (up to ``STOP_WAIT_S``) instead of cancelling it: a pass
leases what it takes for ``LEASE_MS`` before sending it, so one cut between the two would hide
those entries from every mover until the lease ran out. A stopping worker makes such entries
itself: the deliveries it gives back (prefetched before the stop) land here, wake its own mover,
and that mover was cancelled right after taking them, so a stop with no grace left jobs waiting
30 s for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from app.components.worker.envelope import Envelope, recover_id
from app.components.worker.runtime.store import JobStore

logger = logging.getLogger(__name__)

Send = Callable[[list[tuple[str, str]]], Awaitable[None]]

LEASE_MS = 30_000
BATCH = 200
POISON_KEEP_S = 24 * 3600  # how long the failed record of a poisoned job stays readable
LISTEN_S = 5.0  # longest single BLPOP of the wake-up listener (kept below the socket timeout)
STOP_WAIT_S = 5.0  # how long a stop waits for the pass under way (Redis gone: its lease returns the entries)


def _job_id_of(raw: bytes) -> str:
    """The job id an undecodable entry names, if one can be read (the same reading as the
    runtime's for undecodable deliveries)."""
    found = recover_id(raw.decode("utf-8", errors="replace"))
    if found is None or "\ufffd" in found.job_id or not found.job_id.isprintable():
        return ""
    return found.job_id


class DelayedMover:
    """Hands due delayed entries of one queue to the engine (see the module's docstring).

    ``waiter``: a Redis client of the mover's own for the blocking wait on the wake-up list (a
    BLPOP holds its connection); the mover closes it on ``stop``. Without one the mover polls
    every ``poll`` seconds. ``listen``: the longest single BLPOP, below the client's socket
    timeout so a blocking read is never taken for a dead connection."""

    def __init__(
        self, store: JobStore, queue: str, send: Send, poll: float, *, engine: str = "", worker_id: str = "",
        keep: int = POISON_KEEP_S, waiter: Any = None, listen: float = LISTEN_S,
        on_ready: Callable[[], None] | None = None, group: str = "",
    ) -> None:
        self.store = store
        self.queue = queue
        self.send = send
        self.poll = poll
        self.engine = engine
        self.worker_id = worker_id
        self.keep = keep
        self.waiter = waiter
        self.listen = listen
        self.on_ready = on_ready  # the admitter's wake-up: its tokens come through the same BLPOP
        self.group = group  # this worker's group: its own wake-up list is read too
        self.moved = 0
        self.poisoned = 0
        self.passes = 0
        self.next_due: float | None = None  # seconds from the last pass to the earliest entry left
        self._woken = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"delayed-mover-{self.queue}")
        if self.waiter is not None:
            self._listener = asyncio.create_task(self._listen(), name=f"delayed-wake-{self.queue}")

    async def move_due(self) -> int:
        """One pass: send the due entries (up to a batch); how many were taken."""
        self.passes += 1
        raws, wait_ms = await self.store.take_due(self.queue, BATCH, LEASE_MS)
        self.next_due = None if wait_ms is None else wait_ms / 1000
        if not raws:
            return 0
        messages, routed, sent = [], [], []
        for raw in raws:
            try:
                text = raw.decode() if isinstance(raw, bytes) else raw
                env = Envelope.decode(text)
                if env.routed:
                    routed.append(text)  # waits for admission (routing/admit.py), not in the engine
                else:
                    messages.append((env.message_id, text))
                sent.append(raw)
            except (ValueError, TypeError, RecursionError) as exc:
                await self._poison(raw if isinstance(raw, bytes) else raw.encode(), exc)
        if messages:
            await self.send(messages)
        if routed:
            await self.store.route(self.queue, routed)
        await self.store.drop_due(self.queue, sent)
        self.moved += len(messages) + len(routed)
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
        while not self._stopping:
            try:
                self._woken.clear()  # before the pass: a token that comes during it means "again"
                moved = await self.move_due()
                backoff = 1.0
                if moved < BATCH:
                    await self._sleep(self.poll if self.next_due is None else min(self.next_due, self.poll))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep moving once Redis is back
                logger.warning("queue %s: moving delayed jobs failed (%s); retry in %.1fs", self.queue, exc, backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    async def _sleep(self, timeout: float) -> None:
        """Until ``timeout`` (the earliest entry is due, or ``poll``), a wake-up token (when
        listening) or a stop, whichever comes first."""
        if timeout <= 0 or self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._woken.wait()

    async def _listen(self) -> None:
        """Turn wake-up tokens into wake-ups of this process's mover."""
        backoff = 1.0
        while True:
            try:
                woken = await self.store.wait_due(self.waiter, self.queue, self.listen, self.group)
                if woken == "delayed":
                    self._woken.set()
                elif woken == "ready" and self.on_ready is not None:
                    self.on_ready()
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the mover polls meanwhile; listen again once Redis is back
                logger.warning("queue %s: waiting for delayed wake-ups failed (%s); retry in %.1fs",
                               self.queue, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    async def stop(self) -> None:
        """End the pass under way, if any (see the module's docstring), then stop. A pass
        that cannot end within ``STOP_WAIT_S`` is cancelled: what it leased returns when the
        lease runs out."""
        self._stopping = True
        self._woken.set()  # out of its sleep
        if self._listener:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._task:
            done, _ = await asyncio.wait({self._task}, timeout=STOP_WAIT_S)
            if not done:
                logger.warning("queue %s: a pass of the delayed mover did not end within %gs; its entries return "
                               "after their %gs lease", self.queue, STOP_WAIT_S, LEASE_MS / 1000)
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.waiter is not None:
            await self.waiter.aclose()
