"""arq: a sorted set per queue, async slots per process, polled.

Native behaviour the layer neutralises: pickle (JSON serializers on pool and worker),
arq's own tries and result keys (tries set very high, ``keep_result=0``: the runtime owns
both), per-job INFO logs (``log_results=False``, logger quietened), fixed key names
(``arq:job:<id>`` etc., moved under the layer's prefix, see ``_PrefixedWorker``), the
``INFO`` call at startup (refused by ACLs that allow only the data commands), polling an
idle queue every few ms (an idle worker blocks on the queue's wake-up list instead), an
in-progress key that outlives a SIGKILLed attempt by the longest timeout (here a lease of
2 x ``WORKER_OFFLINE_AFTER``, renewed while the job runs), a timeout backstop shorter than a
task's own timeout (sized from the longest), and scores compared with this host's clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import types
from collections.abc import Callable
from typing import Any

import arq.worker as arq_worker
from arq import Worker
from arq.connections import ArqRedis
from arq.worker import func

from app.components.worker.engines.base import Coalescer, EngineAdapter, EngineStats, Handle, keep_running, stand_in
from app.components.worker.envelope import DISPATCH_NAME, now_ms
from app.components.worker.runtime import scripts
from app.components.worker.runtime.ack import DELIVERY_ACK, EngineAck
from app.core.redis import async_pool

BUSY_POLL = 0.005  # between checks while this worker starts jobs: arq's default 0.5 s caps it at ~200 jobs/s
NATIVE_TRIES = 1_000_000
EXPIRES_EXTRA_MS = 7 * 24 * 3600 * 1000
BACKSTOP_EXTRA = 60  # arq cancels a job after the longest timeout + shutdown grace + this
STOP_WAIT = 10.0  # seconds close() waits for arq's loop to end by itself
LEASE_MIN = 5.0  # seconds: arq's in-progress key is a lease of 2 x WORKER_OFFLINE_AFTER, at least this

logger = logging.getLogger(__name__)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_ENCODE = json.encoder.encode_basestring_ascii  # json.dumps of one str, in C


def _serialized(raw: str, enqueue_time_ms: int) -> bytes:
    """``serialize_job(DISPATCH_NAME, (raw,), {}, None, enqueue_time_ms, serializer=_dumps)``
    (the same bytes, checked by a test), without the dict: a bulk enqueue builds one per job."""
    return f'{{"t":null,"f":"{DISPATCH_NAME}","a":[{_ENCODE(raw)}],"k":{{}},"et":{enqueue_time_ms}}}'.encode()


def _loads(data: bytes) -> Any:
    """JSON, and a job the layer did not write (or one arq itself could not run: missing
    fields, other arguments, a non-finite enqueue time) reaches the runtime as a stand-in
    that ends with a job.failed event, instead of arq's log line or a crash of its loop."""
    try:
        job = json.loads(data)
    except ValueError:
        return _job(stand_in("undecodable arq job", data))
    if not isinstance(job, dict):
        return _job(stand_in("arq job that is not an object", data))
    if job.get("f") != DISPATCH_NAME:
        return _job(stand_in(f"foreign arq job for function {job.get('f')!r}", data))
    args, et, tries = job.get("a"), job.get("et"), job.get("t")
    if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], str)) or job.get("k") != {}:
        return _job(stand_in("arq job whose arguments are not one envelope string", data))
    if not (isinstance(et, (int, float)) and math.isfinite(et) and 0 <= et < 1e15) or not (
            tries is None or (isinstance(tries, int) and tries >= 0)):
        return _job(stand_in("arq job with a bad enqueue time or try", data))
    return job


def _job(arg: str) -> dict[str, Any]:
    return {"t": 1, "f": DISPATCH_NAME, "a": [arg], "k": {}, "et": now_ms()}


async def _no_info(*_: Any, **__: Any) -> None:
    """arq logs ``INFO`` output at startup; the layer does not need it and ACLs may refuse it."""


EVERY_ENTRY_DUE = 2**62  # arq's "now" when it picks jobs: the layer never delays through arq


def _prefixed(namespace: str, **more: Any) -> dict[str, Any]:
    """arq.worker's globals with its key names moved under ``namespace``."""
    return {
        **vars(arq_worker),
        "job_key_prefix": f"{namespace}:job:",
        "in_progress_key_prefix": f"{namespace}:in-progress:",
        "retry_key_prefix": f"{namespace}:retry:",
        "result_key_prefix": f"{namespace}:result:",
        "abort_jobs_ss": f"{namespace}:abort",
        "log_redis_info": _no_info,
        **more,
    }


# Every Worker method that names one of arq's key constants (read in arq 0.28's worker.py),
# and the two that pick jobs by comparing scores with this host's clock.
_KEYED = ("main", "run_job", "finish_job", "finish_failed_job", "_cancel_aborted_jobs")
_PICKING = ("_poll_iteration", "start_jobs")


def _rebind(function: Any, globals_: dict[str, Any]) -> Any:
    clone = types.FunctionType(function.__code__, globals_, function.__name__, function.__defaults__,
                               function.__closure__)
    clone.__kwdefaults__ = function.__kwdefaults__
    return clone


class _Stopped(Exception):
    """The worker stopped fetching: arq's main loop ends at the top of an iteration."""


class _PrefixedWorker(Worker):
    """arq's Worker with its keys under the layer's prefix, every queued entry due at once,
    and an idle wait on the wake-up list.

    arq reads its key names from module constants (``arq:job:`` ...); rebinding them in
    ``arq.worker`` would move every Worker of the process. Instead each method that uses them
    runs here with its own copy of the module's globals, so two prefixes can live in one
    process. ``Job`` and ``ArqRedis.enqueue_job`` (arq.jobs, arq.connections) still use the
    fixed names; the layer uses neither. Picking compares a job's score with a far-future
    "now": scores come from the producers' clocks, and a producer whose clock runs ahead of
    this host's would otherwise see its jobs wait out the difference (delays are the layer's)."""

    def __init__(self, *args: Any, namespace: str, wake_keys: list[str], idle_wait: float, lost: Handle,
                 lease: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        keyed = _prefixed(namespace)
        picking = _prefixed(namespace, timestamp_ms=lambda: EVERY_ENTRY_DUE)
        arq_methods = {name: types.MethodType(_rebind(getattr(Worker, name), keyed), self) for name in _KEYED}
        arq_methods.update({name: types.MethodType(_rebind(getattr(Worker, name), picking), self) for name in _PICKING})
        self.arq = arq_methods
        self.main = arq_methods["main"]  # type: ignore[method-assign]
        self.run_job = arq_methods["run_job"]  # type: ignore[method-assign]
        self._cancel_aborted_jobs = arq_methods["_cancel_aborted_jobs"]  # type: ignore[method-assign]
        self.wake_keys = wake_keys
        self.idle_wait = idle_wait
        self.lost = lost
        self._started: int | None = None
        self.waiting = False  # in the idle wait: arq's loop may be cancelled there safely
        self.in_progress_prefix = keyed["in_progress_key_prefix"]
        self.in_progress_timeout_s = lease
        self._take = self.pool.register_script(scripts.source("arq_start"))
        self.keyed = keyed
        self.folded: set[str] = set()  # jobs whose arq keys finish.lua already cleaned
        self.finishes: Coalescer[Callable[[Any], None]] = Coalescer(
            lambda: self.pool, lambda tr, stages: [stage(tr) for stage in stages], transaction=True)

    async def renew_leases(self) -> None:
        """Keep the in-progress keys of this worker's running jobs alive. arq sets them for the
        longest timeout + 10 s, so after a SIGKILL the killed attempt's message would sit in the
        queue for that long (the reaper has long redelivered the job); as a lease renewed here,
        arq delivers it again soon after and the runtime drops it as stale."""
        while True:
            await asyncio.sleep(self.in_progress_timeout_s / 3)
            running = [job_id for job_id, task in self.tasks.items() if not task.done()]
            if running:
                async with self.pool.pipeline(transaction=False) as pipe:
                    for job_id in running:
                        pipe.pexpire(self.in_progress_prefix + job_id, int(self.in_progress_timeout_s * 1000))
                    await pipe.execute()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs, one id at a time so that a stop takes effect between two ids:
        arq's own loop goes on starting the ids of its last read as slots free up."""
        before = set(self.tasks)
        for job_id in job_ids:
            if not self.allow_pick_jobs:
                break
            try:
                job_id.decode()
            except UnicodeDecodeError:  # arq would crash its loop on it, again at every poll
                await self.pool.zrem(self.queue_name, job_id)
                await self.lost(stand_in("arq queue entry whose id is not UTF-8", job_id))
                continue
            await self._start_one(job_id.decode())
        self._started = len(self.tasks.keys() - before)

    async def _start_one(self, job_id: str) -> None:
        """arq's start_jobs for one id (same slots and counters), its check-and-take done by
        arq_start.lua in one round trip instead of four (WATCH, EXISTS, ZSCORE, MULTI/EXEC)."""
        running = self.tasks.get(job_id)
        if running is not None and not running.done():
            return  # running here, its in-progress key lost (a failover): arq's bookkeeping allows one run per id
        await self.sem.acquire()
        if self.job_counter >= self.max_jobs:
            self.sem.release()
            return
        self.job_counter = self.job_counter + 1
        score = await self._take(keys=[self.in_progress_prefix + job_id, self.queue_name],
                                 args=[job_id, int(self.in_progress_timeout_s * 1000)], client=self.pool)
        if score is None:  # running elsewhere, or already finished and removed from the queue
            self.job_counter = self.job_counter - 1
            self.sem.release()
            logger.debug("job %s already running elsewhere", job_id)
            return
        task = self.loop.create_task(self.run_job(job_id, int(float(score))))
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task

    async def finish_job(self, job_id: str, finish: bool, result_data: bytes | None, result_timeout_s: float | None,
                         keep_result_forever: bool, incr_score: int | None, keep_in_progress: float | None) -> None:
        """arq's finish_job (the same commands, in one MULTI), with the finishes of jobs that end
        in the same loop turn sharing one transaction: one round trip per burst, not per job."""
        if finish and job_id in self.folded:
            self.folded.discard(job_id)
            return
        keyed = self.keyed

        def stage(tr: Any) -> None:
            delete_keys = []
            in_progress_key = self.in_progress_prefix + job_id
            if keep_in_progress is None:
                delete_keys.append(in_progress_key)
            else:
                tr.pexpire(in_progress_key, arq_worker.to_ms(keep_in_progress))
            if finish:
                if result_data:
                    expire = None if keep_result_forever else result_timeout_s
                    tr.set(keyed["result_key_prefix"] + job_id, result_data, px=arq_worker.to_ms(expire))
                delete_keys += [keyed["retry_key_prefix"] + job_id, keyed["job_key_prefix"] + job_id]
                tr.zrem(keyed["abort_jobs_ss"], job_id)
                tr.zrem(self.queue_name, job_id)
            elif incr_score:
                tr.zincrby(self.queue_name, incr_score, job_id)
            if delete_keys:
                tr.delete(*delete_keys)

        await self.finishes.run(stage)

    async def finish_failed_job(self, job_id: str, result_data: Any) -> None:
        """With the layer's settings arq fails a job itself only when its job key is missing
        (``_loads`` makes every stored job runnable): let arq clean up, then report it."""
        await self.arq["finish_failed_job"](job_id, result_data)
        await self.lost(stand_in("arq queue entry without its job key", job_id))

    async def _poll_iteration(self) -> None:
        if not self.allow_pick_jobs:
            raise _Stopped  # ends arq's main loop: nothing is left half-started
        self._started = None
        await self.arq["_poll_iteration"]()
        if self._started == 0 and self.allow_pick_jobs:
            # Nothing startable was waiting: sleep until a producer pushes a wake-up token.
            self.waiting = True
            try:
                await self.pool.blpop(self.wake_keys, timeout=self.idle_wait)
            finally:
                self.waiting = False


class Adapter(EngineAdapter):
    name = "arq"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue_key = f"{self.namespace}:{self.config.name}"
        self.job_key_prefix = f"{self.namespace}:job:"
        self._pool: ArqRedis | None = None
        self._worker: _PrefixedWorker | None = None
        self._main: asyncio.Task[None] | None = None
        self._leases: asyncio.Task[None] | None = None

    @property
    def pool(self) -> ArqRedis:
        if self._pool is None:
            connection_pool = async_pool(self.settings)
            self._pool = ArqRedis(
                connection_pool, job_serializer=_dumps, job_deserializer=_loads,
                default_queue_name=self.queue_key, expires_extra_ms=EXPIRES_EXTRA_MS,
            )
        return self._pool

    @property
    def job_timeout(self) -> float:
        """arq's own timeout, a backstop behind the runtime's: past the longest timeout of
        any task of the queue and the shutdown grace, so arq never cancels a job itself."""
        longest = max(self.config.timeout, self.config.longest_timeout)
        return longest + self.settings.worker_shutdown_timeout + BACKSTOP_EXTRA

    async def stage(self, pipe: Any, messages: list[tuple[str, str]]) -> None:
        """What ``ArqRedis.enqueue_job`` writes (job key, then the queue's sorted set), without
        its WATCH round trips: the layer's own record already refuses duplicate ids."""
        now = now_ms()
        for message_id, raw in messages:
            pipe.psetex(self.job_key_prefix + message_id, EXPIRES_EXTRA_MS, _serialized(raw, now))
        pipe.zadd(self.queue_key, {message_id: now for message_id, _ in messages})
        self.stage_wake(pipe, len(messages))

    async def start(self, handle: Handle, instance: str) -> None:
        async def run(ctx: dict[str, Any], raw: str) -> None:
            worker, job_id = self._worker, ctx.get("job_id")
            if worker is None or not isinstance(job_id, str):
                await handle(raw)
                return
            keyed = worker.keyed
            ack = EngineAck("arq", [worker.in_progress_prefix + job_id, keyed["retry_key_prefix"] + job_id,
                                    keyed["job_key_prefix"] + job_id, self.queue_key, keyed["abort_jobs_ss"]],
                            [job_id])
            DELIVERY_ACK.set(ack)  # this job's own task (arq runs each function in a task of its own)
            await handle(raw)
            if ack.done:  # finish.lua cleaned arq's keys with the job's end: arq's finish_job skips it
                worker.folded.add(job_id)

        self._worker = _PrefixedWorker(
            functions=[func(run, name=DISPATCH_NAME, max_tries=NATIVE_TRIES)],
            queue_name=self.queue_key,
            redis_pool=self.pool,
            max_jobs=self.config.threads,
            job_timeout=self.job_timeout,
            keep_result=0,
            max_tries=NATIVE_TRIES,
            poll_delay=BUSY_POLL,
            handle_signals=False,
            job_serializer=_dumps,
            job_deserializer=_loads,
            health_check_interval=60,
            log_results=False,
            expires_extra_ms=EXPIRES_EXTRA_MS,
            namespace=self.namespace,
            wake_keys=[self.wake_key],
            idle_wait=self.idle_wait,
            lost=handle,
            lease=max(LEASE_MIN, 2 * self.settings.worker_offline_after),
        )
        worker = self._worker
        self._main = asyncio.create_task(
            keep_running("arq", worker.async_run, lambda: not worker.allow_pick_jobs, self.consumer),
            name="arq-worker",
        )
        self._leases = asyncio.create_task(self._renew(worker), name="arq-leases")

    @staticmethod
    async def _renew(worker: _PrefixedWorker) -> None:
        while True:
            try:
                await worker.renew_leases()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: the next round renews
                logger.warning("arq: renewing in-progress keys failed (%s)", exc)

    async def stop_fetching(self) -> None:
        if self._worker is not None:
            self._worker.allow_pick_jobs = False

    async def close(self) -> None:
        """arq has no prefetch: a job is taken (its in-progress key set) only when it starts,
        so after the drain nothing fetched is left to hand back."""
        worker, main = self._worker, self._main
        if worker is not None and main is not None and not worker.waiting:
            # Let arq's loop reach the top of an iteration (it ends there once fetching stopped):
            # cancelled inside start_jobs it could leave an in-progress key with no job started.
            await asyncio.wait([main], timeout=STOP_WAIT)
        for task in (main, self._leases):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._worker is not None:
            tasks = [t for t in self._worker.tasks.values() if not t.done()]
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.pool.delete(self._worker.health_check_key)
        if self._pool is not None:
            await self._pool.aclose(close_connection_pool=True)
            self._pool = None
        await self.close_redis()

    async def stats(self) -> EngineStats:
        """One ZCARD. arq keeps a running job in its queue until it ends, and telling it
        apart costs a call per job, so every due entry counts as ``running`` (taken or not);
        the caller subtracts what the layer knows runs (metrics.py)."""
        held = await self.pool.zcard(self.queue_key)
        return EngineStats(ready=0, running=held, dead=0)
