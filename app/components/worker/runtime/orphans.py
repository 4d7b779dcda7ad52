"""Jobs this live worker instance holds in Redis but no longer runs: writes lost in a failover.

Redis replication is asynchronous, so a failover (Sentinel promoting a replica) can lose the
last writes of the old master: a job's finish (its terminal state, events and the engine's
ack, one script) or a requeue. The new master then says the job is ``running``, held by this
instance, which has long finished it. The reaper never touches a live instance's jobs, so
such a job would wait for this worker's restart. This sweep finds them: every ``interval``
it compares this instance's held set with the jobs its runtime has in flight (registered
before their claim is sent), and a job held but not in flight on two passes in a row (so a
claim whose reply is still on its way is never taken for one) is recovered like a dead
worker's job: retried, the lost attempt counting, or failed with WorkerLost. Recovery is a
compare-and-set on the job's state and owner, so a job that ended meanwhile is left alone.
The job may run twice (at-least-once); it still ends with exactly one terminal event.

Under Sentinel the sweep also notices a new master (the pool's master address changes) and
has the engine put back messages recorded as fetched by this worker that it never got or
started (``redeliver_stranded``). The third loss, a claim lost while its run went on, is the
runtime's (``JobRuntime._start_lost``: the refused end runs the delivery again).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis

from app.components.worker.keys import Keys
from app.components.worker.runtime.wrapper import JobRuntime

logger = logging.getLogger(__name__)


class OrphanSweep:
    def __init__(self, redis: aioredis.Redis, keys: Keys, runtime: JobRuntime, offline_after: float,
                 adapter: Any = None) -> None:
        self.redis = redis
        self.keys = keys
        self.runtime = runtime
        self.adapter = adapter
        self._master: object = None  # the master's address, under Sentinel: a change is a failover
        self.me = runtime.worker.instance
        self.interval = max(0.2, min(2.0, offline_after / 4))
        self.recovered = 0
        self._suspects: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"orphans-{self.runtime.queue.name}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - try again next round
                logger.debug("queue %s: orphan sweep failed (%s)", self.runtime.queue.name, exc)

    async def sweep_once(self) -> int:
        await self._after_failover()
        held = {m.decode() if isinstance(m, bytes) else m for m in await self.redis.smembers(self.keys.held(self.me))}
        suspects = {job_id for job_id in held if job_id not in self.runtime.holding}  # read after the reply
        confirmed, self._suspects = suspects & self._suspects, suspects - self._suspects
        count = 0
        for job_id in sorted(confirmed):
            if job_id in self.runtime.holding or self.runtime.stopping:
                continue
            logger.warning("job %s: held by this worker in Redis but not running here (a write lost in a "
                           "failover?): recovering it", job_id)
            await self.runtime.recover_lost(job_id, self.me, 0.0, why=(
                f"worker {self.runtime.worker.worker_id} no longer runs it, but Redis says it does "
                "(its last write was lost, e.g. in a failover)"))
            count += 1
        self.recovered += count
        return count

    async def _after_failover(self) -> None:
        """Under Sentinel, once this process talks to a new master: messages recorded as
        fetched by this worker that it never got (the fetch's reply died with the old master)
        or never started would wait for its restart (arq's in-progress lease lapses by
        itself); the adapter puts them back."""
        master = getattr(getattr(self.redis, "connection_pool", None), "master_address", None)  # none on Cluster
        if master is None or master == self._master:
            return
        redeliver = getattr(self.adapter, "redeliver_stranded", None)
        if self._master is None or redeliver is None:
            self._master = master
            return
        returned = await redeliver(self.me, set(self.runtime.holding))
        self._master = master  # only once done: a pass that failed tries again
        logger.warning("queue %s: new master %s:%s after a failover; %d message(s) recorded as fetched here but "
                       "not running put back on the queue", self.runtime.queue.name, *master, returned)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
