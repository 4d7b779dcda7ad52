"""The admitter: each worker process takes the routed jobs it may start now, and runs them.

Why here and not in the engines: priorities, ``max_concurrency``, groups, selectors, pause and
rate limits all ask *may this job start now, and where?* Inside an engine the answer cannot be
strict (Dramatiq's priority only reorders one worker's prefetch, a stream cannot be reordered),
and at claim time over-limit jobs would bounce between Redis and workers. So a routed job waits
in the layer's ordered sets per (queue, group) (``Keys.ready``: scored by priority band, then
sequence), and a worker with idle slots takes some in one Lua call (admit.lua) that computes
``free = min(idle slots, max_concurrency - live leases)`` (0 while paused), passes over tasks at
their rate limit, and *claims* what it takes for itself: running, held, ``job.started``, a lease.
The worker then runs them at once, through the same wrapper as an engine delivery. A job is
therefore never between Redis and a worker unclaimed: if the worker dies, the reaper recovers
it from the held set like any job, and its lease ends with that recovery (requeue.lua).

A plain queue pays nothing for this: its jobs go through the engine as before; its admitter
sleeps on the wake-up list it shares with the delayed mover (one BLPOP), and checks the ready
sets every ``IDLE_CHECK_S`` in case a token was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging

from app.components.worker.config import QueueConfig
from app.components.worker.envelope import Envelope
from app.components.worker.registry import QueueSpec
from app.components.worker.runtime.store import JobStore
from app.components.worker.runtime.wrapper import JobRuntime

logger = logging.getLogger(__name__)

IDLE_CHECK_S = 5.0  # longest sleep of the admitter of a queue that is not routed by its settings


def rate_limits(queue: QueueSpec) -> str:
    """The queue's task rate limits as admit.lua reads them: task -> [count, period ms]."""
    return json.dumps({name: [t.rate_limit.count, t.rate_limit.period_ms]
                       for name, t in queue.tasks.items() if t.rate_limit is not None}, separators=(",", ":"))


class Admitter:
    """Admits routed jobs of one queue into this worker process (see the module docstring)."""

    def __init__(
        self, store: JobStore, runtime: JobRuntime, config: QueueConfig, labels: dict[str, str], poll: float,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.config = config
        self.queue = config.name
        self.labels = json.dumps(labels, separators=(",", ":"), sort_keys=True)
        self.limits = rate_limits(runtime.queue)
        self.base_poll = poll
        self.poll = poll if config.routed or config.group else max(poll, IDLE_CHECK_S)
        self.admitted = 0
        self.state = ""  # the queue's state at the last pass: '' | 'paused' | 'full'
        self._rate_wait: float | None = None
        self._woken = asyncio.Event()
        self._passes = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._running: dict[asyncio.Task[None], str] = {}  # started here -> job id

    def wake(self) -> None:
        """Check the ready sets now (a token came, or one of this admitter's jobs ended)."""
        self._woken.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"admitter-{self.queue}")

    def free_slots(self) -> int:
        """Idle slots of this process: a job started here counts from the moment its task is
        created, before it runs its first step (and enters the runtime's in-flight set)."""
        return self.config.threads - len(self.runtime.inflight | self._running.keys())

    async def admit_once(self) -> int:
        """One pass: take and start up to this process's idle slots; how many started.

        The call is shielded: once sent, admit.lua may have claimed jobs for this instance,
        so a cancellation (a stop) waits for the reply and starts what came back (a stopping
        runtime hands them back at once, without counting an attempt) before it goes on."""
        free = self.free_slots()
        if free <= 0 or self.runtime.stopping:
            return 0
        worker = self.runtime.worker
        call = asyncio.ensure_future(self.store.admit(
            self.queue, worker.instance, worker.worker_id, self.config.engine, self.config.group, self.labels,
            free, self.config.max_concurrency, self.limits, f"{worker.instance}:a{next(self._passes)}:",
        ))
        cancelled = False
        while True:
            try:
                reply = await asyncio.shield(call)
                break
            except asyncio.CancelledError:
                if call.cancelled():
                    raise
                cancelled = True
        self.state = reply.state
        if reply.taken or reply.state == "paused":
            self.poll = self.base_poll  # the queue is in use: check it as often as a routed one
        self._rate_wait = None if reply.wait_ms is None else reply.wait_ms / 1000
        for raw, attempt, job_id, task in reply.taken:
            self._start_raw(raw, attempt, job_id, task)
        self.admitted += len(reply.taken)
        if cancelled:
            raise asyncio.CancelledError
        if reply.held > len(self.runtime.inflight | self._running.keys()):
            await self.adopt_orphans()  # an earlier pass's reply was lost (maybe resent by the client)
        return len(reply.taken)

    def _start_raw(self, raw: bytes, attempt: int, job_id: str, task: str) -> None:
        try:
            env = Envelope.decode(raw.decode() if isinstance(raw, bytes) else raw)
        except Exception as exc:  # noqa: BLE001 - admit.lua checks what it can; this ends what slips through
            self._track(asyncio.create_task(self.runtime.fail_admitted(job_id, task, attempt, raw, exc)), job_id)
            return
        self._start(env, attempt)

    def _start(self, env: Envelope, attempt: int) -> None:
        self._track(asyncio.create_task(self.runtime.execute_admitted(env, attempt), name=f"job-{env.id}"), env.id)

    def _track(self, task: asyncio.Task[None], job_id: str) -> None:
        self._running[task] = job_id

        def done(finished: asyncio.Task[None]) -> None:
            self._running.pop(finished, None)
            self.wake()  # a slot of this process is free again

        task.add_done_callback(done)

    async def adopt_orphans(self) -> int:
        """Run the jobs an admission claimed for this instance whose reply never came back (the
        connection broke after the script ran): they are ``running`` here, held, and no one
        else would run them while this instance beats. Called after a failed pass."""
        worker = self.runtime.worker
        mine = f"{worker.instance}:a"
        ours = set(self._running.values())
        adopted = 0
        for member in await self.store.redis.smembers(self.store.keys.held(worker.instance)):
            job_id = member.decode() if isinstance(member, bytes) else member
            if job_id in ours:
                continue
            record = await self.store.lost_job(job_id)
            if (not record or record.get("status") != "running" or record.get("owner") != worker.instance
                    or not record.get("delivery", "").startswith(mine)):
                continue
            logger.warning("job %s: admitted here but its admission reply was lost: running it now", job_id)
            self._start_raw(record.get("envelope", "").encode(), int(record.get("attempt") or 1), job_id,
                            record.get("task", ""))
            adopted += 1
        return adopted

    async def _run(self) -> None:
        backoff = 1.0
        orphans = False
        while True:
            try:
                self._woken.clear()  # before the pass: a wake-up during it means "again"
                if orphans:
                    await self.adopt_orphans()
                    orphans = False
                started = await self.admit_once()
                backoff = 1.0
                if started and self.free_slots() > 0:
                    continue  # more may be ready and there is room: at once
                await self._sleep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep admitting once Redis is back
                orphans = True  # a pass whose reply was lost may have claimed jobs for us
                logger.warning("queue %s: admitting routed jobs failed (%s); retry in %.1fs", self.queue, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    async def _sleep(self) -> None:
        timeout = self.poll if self._rate_wait is None else min(self._rate_wait, self.poll)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._woken.wait()

    async def stop(self) -> None:
        """Take no more jobs; the ones started go on and are drained with the others."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
