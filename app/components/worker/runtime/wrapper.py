"""The shared job wrapper: what happens around every job, on every engine.

An engine adapter hands each message to ``JobRuntime.execute`` and acks it when that
returns. ``execute`` never raises for a job's own failure: it claims the delivery (skipping
duplicates and stale redeliveries), counts the attempt, runs the task under its timeout,
writes the result, decides the retry and calls the middleware (which publishes events).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from redis.exceptions import RedisError

from app.components.worker.config import QueueConfig
from app.components.worker.envelope import Envelope, now_ms, recover_id
from app.components.worker.events import EventPublisher
from app.components.worker.middleware import MiddlewareChain, SkipJob
from app.components.worker.registry import QueueSpec, TaskSpec
from app.components.worker.runtime.ack import DELIVERY_ACK
from app.components.worker.runtime.context import JobContext, WorkerContext, set_current
from app.components.worker.runtime.policy import JobTimeout, NonRetryable, RetryPolicy, WorkerLost, describe_error
from app.components.worker.runtime.store import JobStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

TASKIQ_FLUSH_DEFER = 16  # loop iterations a batch of claims/finishes may wait on taskiq (batch.py)
MAX_BIND_SHAPES = 1024  # shapes of task calls remembered as binding (task, positional count, names)
HAND_BACK_WAIT_S = 5.0  # after the grace: how long a stop waits for interrupted jobs to be handed back


class UnknownTaskError(NonRetryable):
    pass


class MalformedMessage(NonRetryable):
    pass


class BadArguments(NonRetryable):
    pass


class ResultNotSerializable(NonRetryable):
    pass


class StaleDelivery(NonRetryable):
    """A delivery of a job the layer has no record of."""


class TaskCancelled(Exception):
    """The task itself ended with ``CancelledError`` (it awaited something that was
    cancelled): an ordinary failed attempt, retried per policy. Only a cancellation by this
    worker's own shutdown (``drain``) hands a job back without counting the attempt."""


LOST_START_RERUNS = 2  # a delivery whose start Redis lost (a failover) runs again, at most this often


class JobRuntime:
    def __init__(
        self,
        queue: QueueSpec,
        config: QueueConfig,
        store: JobStore,
        middleware: MiddlewareChain,
        worker: WorkerContext,
        publisher: EventPublisher | None = None,
    ) -> None:
        self.publisher = publisher
        self.queue = queue
        self.config = config
        self.store = store
        if config.engine == "dramatiq":
            # Its jobs run on threads that each block on the loop for every reply: a flush
            # deferred for other ready callbacks (runtime/batch.py) costs them latency that
            # the loop cannot fill with other work (measured: 5-18% less drain, no CPU saved).
            store.set_flush_defer(0)
        elif config.engine == "taskiq":
            # taskiq's receiver hands one message per few loop turns: a longer wait lets the
            # claims and finishes of several jobs share a send (measured with bench/ab.py:
            # drain 1.29x, Redis CPU per job -35% against 4; on arq, whose poll loop starts
            # jobs in bursts, 16 drained less than 4).
            store.set_flush_defer(TASKIQ_FLUSH_DEFER)
        self.middleware = middleware
        self.worker = worker
        self.executor = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix=f"job-{queue.name}")
        self.inflight: set[asyncio.Task[Any]] = set()
        self.holding: Counter[str] = Counter()  # job ids of the deliveries in flight (runtime/orphans.py)
        self.done = 0
        self.failed = 0
        self.stopping = False
        self._interrupted: set[asyncio.Task[Any]] = set()  # the tasks drain() cancelled
        self._running_job: set[asyncio.Task[Any]] = set()  # past claim and stop check: drain() may cancel these
        self._deliveries = itertools.count()  # with the instance id: unique per delivery
        self._binds: set[tuple[Any, ...]] = set()  # shapes of calls known to bind (see _invoke)

    @property
    def running(self) -> int:
        return len(self.inflight)

    async def execute(self, raw: str | bytes) -> None:
        """Run one delivery. Returns normally when the engine may ack the message."""
        try:
            text = raw.decode() if isinstance(raw, bytes) else raw
            env = Envelope.decode(text)
        except Exception as exc:  # noqa: BLE001 - ValueError, RecursionError, UnicodeDecodeError...
            await self._malformed(raw, exc)
            return
        with self._in_flight(env.id):
            await self._execute(env, text)

    @contextlib.contextmanager
    def _in_flight(self, job_id: str) -> Iterator[None]:
        """Count the current task as a delivery of this process (slots, drain) while it lasts,
        and its job as one this process holds (before its claim is sent: see runtime/orphans.py)."""
        task = asyncio.current_task()
        if task is not None:
            self.inflight.add(task)
        self.holding[job_id] += 1
        try:
            yield
        finally:
            if task is not None:
                self.inflight.discard(task)
            self.holding[job_id] -= 1
            if self.holding[job_id] <= 0:
                del self.holding[job_id]

    async def _malformed(self, raw: str | bytes, exc: Exception) -> None:
        """A message no worker can decode: acked so it cannot jam the queue, but never
        silently: it is logged and ends with a job.failed event. When its job id can still be
        read (a regex on the text), that job's record ends too (failed, MalformedMessage), so
        its status is never ``queued`` forever."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        why = "nested too deep to decode" if isinstance(exc, RecursionError) else (str(exc) or type(exc).__name__)
        logger.error("queue %s: malformed message removed (%s): %.200s", self.queue.name, why, text)
        self.failed += 1
        foreign = text.startswith("<") and text.endswith(">")  # an adapter's stand-in
        reason = text[1:-1] if foreign else f"{why}: {text[:200]!r}"
        found = None if foreign else recover_id(text)
        if found is not None:
            if await self._reject(found.job_id, found.run or None, found.try_, found.task, MalformedMessage(reason)):
                return
            reason = f"{reason} (job {found.job_id} not waiting for this delivery: left as it is)"
        job = self._job_context("", "", 0)
        await self.middleware.call("on_failure", job, MalformedMessage(reason))

    def _job_context(self, job_id: str, task: str, attempt: int, enqueued_at: int = 0) -> JobContext:
        return JobContext(job_id=job_id, task=task, queue=self.queue.name, engine=self.config.engine,
                          attempt=attempt, max_tries=0, enqueued_at=enqueued_at, worker_id=self.worker.worker_id,
                          worker=self.worker, started_ms=now_ms())

    async def _reject(self, job_id: str, run: str | None, try_: int, task: str, error: Exception,
                      enqueued_at: int = 0) -> bool:
        """End a job whose delivery cannot run, with one job.failed event (see reject.lua)."""
        job = self._job_context(job_id, task, 0, enqueued_at)
        kind, message = describe_error(error)
        record: dict[str, Any] = {
            "job_id": job_id, "queue": self.queue.name, "task": task, "status": "failed", "attempts": 0,
            "engine": self.config.engine, "worker_id": self.worker.worker_id, "enqueued_at": enqueued_at,
            "started_at": None, "result": None, "error": message, "error_type": kind,  # finished_at: Redis's
        }
        await self.middleware.call("on_failure", job, error, job_id=job_id)
        done = await self._write(job_id, "rejection", lambda events: self.store.reject(
            job_id, run, try_, self.queue.name, task, self.config.engine, record, self.config.keep_result, events))
        if done:
            logger.warning("job %s: %s: %s", job_id, kind, message)
        return done

    async def execute_admitted(self, env: Envelope, attempt: int) -> None:
        """Run a job its admitter has already claimed for this instance (routing/admit.py):
        the same path as an engine delivery, past the claim."""
        with self._in_flight(env.id):
            await self._run_claimed(env, attempt)

    async def fail_admitted(self, job_id: str, task: str, attempt: int, raw: str | bytes, exc: Exception) -> None:
        """An admitted job whose envelope does not decode: it was claimed for this instance, so
        it ends here, failed (MalformedMessage), freeing its lease, with its events."""
        with self._in_flight(job_id):
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            error = MalformedMessage(f"undecodable routed entry ({type(exc).__name__}: {exc}): {text[:200]!r}")
            await self._finish(Envelope(job_id, task or "?", self.queue.name, try_=attempt),
                               self._job_context(job_id, task, attempt), "failed", error=error)

    async def _execute(self, env: Envelope, raw: str) -> None:
        for _ in range(1 + LOST_START_RERUNS):
            claimed, value = await self._claim(env)
            if not claimed:
                if value == "norecord":
                    # Its record expired after keep_result, or the message was written behind the
                    # layer's back: running it could repeat a finished job; dropping it silently
                    # would lose one. It ends as failed, with one event.
                    await self._reject(env.id, env.run, env.try_, env.task, StaleDelivery(
                        f"no record of job {env.id} (expired after keep_result, or written behind the layer's back): "
                        "not run"), env.enqueued_at)
                    return
                logger.debug("job %s: delivery for try %d skipped (%s)", env.id, env.try_, value)
                return
            await self._run_claimed(env, int(value))
            if not await self._start_lost(env):
                return
            logger.warning("job %s: Redis lost the start of this run (a failover?) and still waits for this "
                           "delivery: running it again", env.id)

    async def _start_lost(self, env: Envelope) -> bool:
        """True when this delivery's end was refused because Redis no longer knows it started:
        the claim was lost in a failover (the new master's copy lagged), so the job is still
        queued for this very delivery. Acking it now would leave the job queued with no
        message; running it again ends it. Read only when the end did not ack the delivery."""
        ack = DELIVERY_ACK.get()
        if ack is None or ack.done or self.stopping:
            return False
        record = await self.store.lost_job(env.id)
        return bool(record and record.get("status") == "queued" and record.get("run") == env.run
                    and int(record.get("attempt") or 0) < env.try_)

    async def _run_claimed(self, env: Envelope, attempt: int) -> None:
        if self.stopping:
            # A message prefetched before the stop: give it back rather than start it now.
            await self._hand_back(env, attempt, "delivered during the stop, not started")
            return
        spec = self.queue.tasks.get(env.task)
        policy = self._policy(spec, env)
        job = JobContext(
            job_id=env.id, task=env.task, queue=env.queue, engine=self.config.engine, attempt=attempt,
            max_tries=policy.max_tries, enqueued_at=env.enqueued_at, worker_id=self.worker.worker_id,
            worker=self.worker, started_ms=now_ms(), tags=env.tags,
        )
        try:
            result = await self._run_job(spec, env, job)
        except asyncio.CancelledError:
            if self._interrupted_by_shutdown():
                await self._hand_back(env, attempt)
                return
            # Not ours: the task awaited something that was cancelled, or an engine cancelled
            # it. Handing it back would redeliver it forever without counting an attempt.
            await self._failed(env, job, policy, TaskCancelled(
                f"{env.task} was cancelled (CancelledError) while this worker was not stopping"))
            return
        except SkipJob as exc:
            await self._finish(env, job, "cancelled", error=exc)
            return
        except Exception as exc:  # noqa: BLE001 - a job's failure is data, not a crash
            if self._interrupted_by_shutdown():  # it turned our cancellation into an error
                await self._hand_back(env, attempt)
                return
            await self._failed(env, job, policy, exc)
            return
        await self._finish(env, job, "completed", result=result)

    async def _claim(self, env: Envelope) -> tuple[bool, int | str]:
        """Claim the delivery, and never lose a claim to a cancellation. Once the claim script
        is sent it may run whatever happens to this task (the job then is ``running``, owned
        by this instance), so a cancellation meanwhile (an engine's, or a process exit) waits
        for the reply, gives a claimed job back, and only then goes on."""
        delivery = f"{self.worker.instance}:{next(self._deliveries)}"
        args = (env, self.worker.worker_id, self.worker.instance, self.config.engine, delivery)
        # The first try is the script's own future (no task of its own: one per job costs);
        # only when Redis fails it does a task retry it (``_persist``).
        claim: asyncio.Future[Any] = self.store.claim_call(*args)
        retrying = False
        cancelled = False
        while True:
            try:
                reply = await asyncio.shield(claim)
                claimed, value = reply if retrying else self.store.claimed(reply)
                break
            except asyncio.CancelledError:
                if claim.cancelled():
                    raise
                cancelled = True  # wait for the claim's outcome, then cancel
            except (RedisError, OSError) as exc:
                if retrying:
                    raise
                logger.warning("job %s: cannot write claim (%s); retrying", env.id, exc)
                retrying = True
                claim = asyncio.ensure_future(self._persist(env.id, "claim", lambda: self.store.claim(*args)))
        if cancelled:
            if claimed:
                await self._hand_back(env, int(value), "cancelled while claiming it")
            raise asyncio.CancelledError
        return claimed, value

    async def _run_job(self, spec: TaskSpec | None, env: Envelope, job: JobContext) -> Any:
        """The part of a delivery that runs the job: the only part ``drain`` interrupts."""
        task = asyncio.current_task()
        if task is not None:
            self._running_job.add(task)
        try:
            await self.middleware.call("before_process", job, job_id=env.id, allow_skip=True)
            if spec is None:
                raise UnknownTaskError(
                    f"task {env.task!r} is not in queue {env.queue!r} on this worker (deploy the code that defines it)"
                )
            result = await self._invoke(spec, env, job)
            if not (result is None or isinstance(result, (str, int, bool))):
                try:
                    json.dumps(result, allow_nan=False)
                except (TypeError, ValueError) as exc:
                    raise ResultNotSerializable(
                        f"result of {env.task!r} is not JSON ({exc}): return JSON types") from None
            return result
        finally:
            if task is not None:
                self._running_job.discard(task)

    def _policy(self, spec: TaskSpec | None, env: Envelope | None = None) -> RetryPolicy:
        """Attempts and backoff: the job's own ``_max_tries`` > the task's > the queue's."""
        cfg = self.config
        own = env.max_tries if env is not None else None
        if spec is None:
            return RetryPolicy(own or cfg.max_tries, cfg.backoff, cfg.backoff_max)
        return RetryPolicy(
            own or spec.max_tries or cfg.max_tries,
            spec.retry_backoff if spec.retry_backoff is not None else cfg.backoff,
            cfg.backoff_max,
        )

    async def _invoke(self, spec: TaskSpec, env: Envelope, job: JobContext) -> Any:
        kwargs = env.kwargs
        if spec.context_param:
            kwargs = {**kwargs, spec.context_param: job}
        # Whether arguments bind depends only on how many are positional and which names are
        # passed, not on their values: checked once per shape of call (inspect's bind is slow).
        shape = (spec.name, len(env.args), *kwargs)
        if shape not in self._binds:
            try:
                spec.signature.bind(*env.args, **kwargs)
            except TypeError as exc:
                raise BadArguments(f"arguments do not match {spec.name}(): {exc}") from None
            if len(self._binds) < MAX_BIND_SHAPES:
                self._binds.add(shape)
        timeout = env.timeout or spec.timeout or self.config.timeout  # the job's own > the task's > the queue's
        token = set_current(job)
        try:
            if spec.is_async:
                coro = spec.func(*env.args, **kwargs)
            else:
                loop = asyncio.get_running_loop()
                call = functools.partial(contextvars.copy_context().run, spec.func, *env.args, **kwargs)
                coro = loop.run_in_executor(self.executor, call)
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    return await coro
            except TimeoutError:
                if deadline.expired():  # not a TimeoutError the task itself raised
                    raise JobTimeout(f"job exceeded its {timeout:g}s timeout") from None
                raise
        finally:
            set_current(None)
            del token

    async def _failed(self, env: Envelope, job: JobContext, policy: RetryPolicy, exc: Exception) -> None:
        if policy.should_retry(job.attempt, exc):
            delay = policy.delay(job.attempt, exc)
            kind, message = describe_error(exc)
            logger.info("job %s: %s attempt %d/%d failed (%s: %s), retry in %.2fs",
                        env.id, env.task, job.attempt, policy.max_tries, kind, message, delay)
            await self.middleware.call("on_retry", job, exc, delay, job_id=env.id)
            await self._write(env.id, "retry", lambda events: self.store.requeue(
                env.next_try(job.attempt), self.worker.instance, job.attempt, record_attempt=job.attempt,
                delay_ms=int(delay * 1000), events=events))
            return
        await self._finish(env, job, "failed", error=exc)

    async def _finish(
        self, env: Envelope, job: JobContext, status: str, *, result: Any = None,
        error: BaseException | None = None, instance: str | None = None,
    ) -> None:
        record: dict[str, Any] = {
            "job_id": env.id, "queue": env.queue, "task": env.task, "status": status,
            "attempts": job.attempt, "engine": job.engine, "worker_id": job.worker_id,
            "enqueued_at": env.enqueued_at, "started_at": job.started_ms, "finished_at": now_ms(),
            "result": result, "error": None, "error_type": None,
        }
        if env.tags:
            record["tags"] = env.tags
        if error is not None:
            record["error_type"], record["error"] = describe_error(error)
        if status == "completed":
            await self.middleware.call("after_process", job, result, job_id=env.id)
        else:
            logger.warning("job %s: %s failed after %d attempt(s): %s: %s",
                           env.id, env.task, job.attempt, record["error_type"], record["error"])
            await self.middleware.call("on_failure", job, error, job_id=env.id)
        ack = DELIVERY_ACK.get() if instance is None else None  # the delivery this task handles
        written = await self._write(env.id, "result", lambda events: self.store.finish(
            env, instance or self.worker.instance, job.attempt, status, record, self.config.keep_result, events,
            ack))
        if ack is not None and written:
            ack.done = True
        if status == "completed":
            self.done += 1
        else:
            self.failed += 1

    async def _persist(self, job_id: str, what: str, write: Callable[[], Awaitable[T]]) -> T:
        """A state change the job cannot do without: retried while Redis is unreachable
        (0.05 s doubling to 5 s), so a Redis restart delays a job instead of losing it."""
        delay = 0.05
        while True:
            try:
                return await write()
            except (RedisError, OSError) as exc:
                logger.warning("job %s: cannot write %s (%s); retrying in %.2fs", job_id, what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write(self, job_id: str, what: str, write: Callable[[list[dict[str, str]]], Awaitable[T]]) -> T:
        """A state change, carrying the job's held events in the same script. The events are
        taken once and the same ones go with every retry of the write; when the script refuses
        (the attempt is no longer ours, or a retry after a lost reply) they are not written by
        anyone else: a job's events exist only as part of the state change they report."""
        events = self.publisher.take(job_id) if self.publisher else []

        async def attempt() -> T:
            return await write(events)

        result = await self._persist(job_id, what, attempt)
        if self.publisher:
            self.publisher.settled(events, bool(result))
        return result

    def _interrupted_by_shutdown(self) -> bool:
        return asyncio.current_task() in self._interrupted

    async def _hand_back(self, env: Envelope, attempt: int, why: str = "interrupted by shutdown") -> None:
        """The worker is stopping and this job did not finish in the grace period (or was never
        started): put it back to wait for the same attempt (a shutdown is not the job's fault)."""
        logger.warning("job %s: %s, handed back to queue %s", env.id, why, env.queue)
        try:
            await asyncio.shield(self.store.requeue(env, self.worker.instance, attempt, record_attempt=attempt - 1,
                                                    delay_ms=0))
        except Exception:  # noqa: BLE001
            logger.exception("job %s: hand-back failed; crash recovery will redeliver it", env.id)

    async def recover_lost(self, job_id: str, dead_instance: str, lost_for: float, why: str | None = None) -> None:
        """A job held by a dead worker instance: retry it (the lost attempt counts) or, when
        that was its last attempt, fail it with WorkerLost. Called by the reaper, and by the
        orphan sweep for a job this live instance holds but no longer runs (``why``)."""
        record = await self.store.lost_job(job_id)
        if not record or record.get("status") != "running" or record.get("owner") != dead_instance:
            await self.store.redis.srem(self.store.keys.held(dead_instance), job_id)
            return
        try:
            env = Envelope.decode(record.get("envelope", ""))
        except Exception as exc:  # noqa: BLE001 - a record no worker can run ends as failed, not stuck
            attempt = int(record.get("attempt") or 1)
            text = record.get("envelope", "")
            error = MalformedMessage(f"undecodable envelope of a lost job ({type(exc).__name__}: {exc}): {text[:200]!r}")
            job = self._job_context(job_id, record.get("task", ""), attempt)
            await self._finish(Envelope(job_id, record.get("task") or "?", self.queue.name, try_=attempt), job,
                               "failed", error=error, instance=dead_instance)
            return
        attempt = int(record.get("attempt") or env.try_)
        spec = self.queue.tasks.get(env.task)
        policy = self._policy(spec, env)
        job = JobContext(
            job_id=env.id, task=env.task, queue=env.queue, engine=self.config.engine, attempt=attempt,
            max_tries=policy.max_tries, enqueued_at=env.enqueued_at, worker_id=record.get("worker", ""),
            worker=self.worker, started_ms=int(record.get("started_at") or now_ms()), tags=env.tags,
        )
        error = WorkerLost(why or f"worker {job.worker_id} stopped beating {lost_for:.0f}s ago while running attempt {attempt}")
        if policy.should_retry(attempt, error):
            await self.middleware.call("on_retry", job, error, 0.0, job_id=env.id)
            moved = await self._write(env.id, "recovery", lambda events: self.store.requeue(
                env.next_try(attempt), dead_instance, attempt, record_attempt=attempt, delay_ms=0, events=events))
            if moved:
                logger.warning("job %s: %s; redelivering as attempt %d", env.id, error, attempt + 1)
            return
        await self._finish(env, job, "failed", error=error, instance=dead_instance)

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for running jobs, then interrupt and hand back the rest.

        Only a task that is running a job (claimed, past the stop check: ``_run_job``) is
        interrupted. A delivery that is claiming, handing back or writing its result is left
        to end by itself: cancelled there, a job could stay ``running`` with nobody to end it.
        Deliveries an engine hands over during the drain (prefetched before the stop) claim
        and give their job back; the drain waits for them too, up to ``HAND_BACK_WAIT_S``."""
        loop = asyncio.get_running_loop()
        if self.inflight:
            logger.info("waiting up to %gs for %d running job(s)", grace, len(self.inflight))
            await asyncio.wait(set(self.inflight), timeout=grace)
        deadline = loop.time() + HAND_BACK_WAIT_S
        while pending := {t for t in self.inflight if not t.done()}:
            for task in pending & self._running_job - self._interrupted:
                self._interrupted.add(task)  # before cancel(): _execute tells our cancellation from the task's own
                task.cancel()
            left = deadline - loop.time()
            if left <= 0:
                logger.warning("%d deliveries still unfinished %gs after the grace; crash recovery returns their jobs",
                               len(pending), HAND_BACK_WAIT_S)
                return
            await asyncio.wait(pending, timeout=min(left, 0.5), return_when=asyncio.FIRST_COMPLETED)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
