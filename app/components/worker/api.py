"""What application code imports: enqueue from async or sync code, and job handles.

    from app.components.worker import enqueue, enqueue_sync

    job = await enqueue(send_email, "a@b.c")                   # by function
    job = await enqueue("cleanup_temp_files", days_old=3)      # by name
    job = await enqueue("io_simulation_task", _queue="load_test", _job_id="nightly", _delay=60)
    value = await job.result(timeout=30)                        # raises JobFailed on failure

    job = enqueue_sync("cleanup_temp_files", days_old=3)        # a script, a Django view
    job.result(timeout=30)

Options take a leading underscore so they never collide with a task's own parameters.
The engine behind each queue is the operator's choice; this code does not change with it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from app.components.worker import config as queue_config
from app.components.worker.bulk import Bulk
from app.components.worker.config import QueueConfig
from app.components.worker.engine_switch import live_engine_beats
from app.components.worker.engines import engine_class
from app.components.worker.engines.base import EngineAdapter
from app.components.worker.envelope import Envelope, new_job_id, new_run, now_ms
from app.components.worker.keys import Keys
from app.components.worker.middleware import MiddlewareChain, load_middleware
from app.components.worker.registry import QueueSpec, Registry, TaskSpec
from app.components.worker.routing.options import (
    DEFAULT_PRIORITY,
    Route,
    canonical_selector,
    check_fallback,
    check_group,
    check_priority,
    check_selector,
    check_tags,
    first,
)
from app.components.worker.runtime import scripts
from app.components.worker.runtime.batch import call_script
from app.components.worker.runtime.store import read_result, read_status
from app.components.worker.validation import MAX_DEPTH, check_depth, validate_delay, validate_job_id, validate_timeout
from app.core import redis_wait
from app.core.errors import (
    AppError,
    DuplicateJob,
    EngineMismatch,
    InvalidOption,
    JobFailed,
    JobNotFound,
    PayloadError,
    RedisUnavailable,
    ResultTimeout,
)
from app.core.redis import async_client, describe, explain
from app.core.redis_cluster import refuse_engine
from app.core.settings import Settings, get_settings

T = TypeVar("T")
RouteOptions = tuple[Any, ...] | None  # priority, group, selector, fallback, tags[, timeout, max_tries]
ENGINE_CHECK_TTL_S = 2.0
ENQUEUE_CHUNK = 1000  # jobs per enqueue script call: one atomic step, a few ms of Redis time


class Accepting(NamedTuple):
    """One job on its way into ``enqueue.lua``."""

    env: Envelope
    raw: str
    delay_ms: int  # 0: deliverable now
    engine: str
    chosen: bool  # a caller-chosen id (may be refused as a duplicate)
    fallback: str = "wait"


@dataclass
class ProducerQueue:
    """What a producer knows of one queue, resolved once: its spec, tuning, producer-side
    middleware and routing defaults. The engine is not here: it can follow the queue's live
    workers (``WorkerClient.engine_of``)."""

    spec: QueueSpec
    config: QueueConfig
    chain: MiddlewareChain
    prefix: str  # '<prefix>:{<queue>}:', the queue's own keys (routing, dead letters)
    explicit_engine: str | None  # the engine someone chose (flag, env, WorkerSettings), read once
    keys: Keys = field(default_factory=Keys)  # the queue's keys (Keys.for_queue: its own slot on Cluster)

    def route(self, task: TaskSpec, priority: str | None, group: str | None,
              selector: Mapping[str, str] | None, fallback: str | None) -> Route:
        """The job's routing, the most specific setting winning: enqueue > task > queue."""
        if group is not None and selector is not None:
            raise InvalidOption("pass _worker_group or _worker_selector, not both")
        if group is not None or selector is not None:
            target = (check_group(group, "_worker_group") if group is not None else "",
                      canonical_selector(check_selector(selector, "_worker_selector")) if selector is not None else "")
        elif task.worker_group or task.worker_selector:
            target = (task.worker_group or "", task.worker_selector or "")
        else:
            target = (self.spec.worker_group or "", self.spec.worker_selector or "")
        return Route(
            priority=check_priority(priority, "_priority") if priority is not None else task.priority or DEFAULT_PRIORITY,
            group=target[0], selector=target[1],
            fallback=check_fallback(fallback, "_fallback") if fallback is not None
            else first(task.fallback, self.spec.fallback, "wait"),
        )


def _delay_ms(delay: float) -> int:
    """A validated delay in seconds as the relative ms the enqueue script adds to Redis time."""
    return int(round(delay * 1000))


class WorkerClient:
    """Enqueues jobs and reads their state; one per event loop."""

    def __init__(self, settings: Settings | None = None, registry: Registry | None = None) -> None:
        self.settings = settings or get_settings()
        self.registry = registry or Registry.discover(self.settings.queue_packages)
        self.keys = Keys.from_settings(self.settings)  # on Cluster, each queue's keys: self.queue(name).keys
        self.redis = async_client(self.settings)
        # Records what an engine stages (never executed): a plain pipeline, also on Redis Cluster.
        self._recorder = aioredis.Redis() if self.keys.cluster else self.redis
        self._enqueue_script = self.redis.register_script(scripts.source("enqueue"))
        self._adapters: dict[tuple[str, str], EngineAdapter] = {}
        self._global_middleware = load_middleware(self.settings.middleware_paths)
        self._queues: dict[str, ProducerQueue] = {}
        self._engine_checked: dict[str, float] = {}
        self._live: dict[str, dict[str, int]] = {}
        self._bulk: Bulk | None = None

    def queue(self, name: str) -> ProducerQueue:
        """The producer's facts about one queue, resolved on first use."""
        found = self._queues.get(name)
        if found is None:
            spec = self.registry.queue(name)
            found = self._queues[name] = ProducerQueue(
                spec, queue_config.resolve(spec, self.settings),
                MiddlewareChain([*self._global_middleware, *spec.middleware]), self.keys.of_queue(name, ""),
                queue_config.explicit_engine_for(spec, self.settings), self.keys.for_queue(name))
        return found

    def engine_of(self, queue: str) -> str:
        """The explicit engine (flag, WORKER_BACKEND*, WorkerSettings.backend), else the one the
        queue's live workers announced at the last ``_check_engine``, else the default."""
        return queue_config.choose_engine(self.queue(queue).explicit_engine, self._live.get(queue, {}),
                                          self.settings.worker_backend)

    def _chain(self, queue: str) -> MiddlewareChain:
        """Producer-side hooks (before/after enqueue): global middleware, then the queue's."""
        return self.queue(queue).chain

    @staticmethod
    def _hook_view(env: Envelope, delay: float | None) -> dict[str, Any]:
        return {"job_id": env.id, "task": env.task, "queue": env.queue, "args": env.args,
                "kwargs": env.kwargs, "delay": delay}

    def _adapter(self, queue: str) -> EngineAdapter:
        engine = self.engine_of(queue)
        if (queue, engine) not in self._adapters:
            if self.keys.cluster:
                refuse_engine(engine, queue)
            cfg = queue_config.with_engine(self.queue(queue).config, engine)
            self._adapters[(queue, engine)] = engine_class(engine)(self.settings, self.queue(queue).keys, cfg)
        return self._adapters[(queue, engine)]

    async def _check_engine(self, queue: str) -> None:
        """Learn the engines the queue's live workers announce (``engine_of`` follows them when
        nothing explicit is set); refuse an explicit engine that no live worker reads."""
        checked = self._engine_checked.get(queue)
        if checked is not None and time.monotonic() - checked < ENGINE_CHECK_TTL_S:
            return
        try:
            if self.keys.cluster and checked is None:  # Redis Cluster: readers find the queue's keys from here
                await self.redis.sadd(self.keys.queues, queue)
            self._live[queue] = live = await live_engine_beats(
                self.redis, self.queue(queue).keys, queue, self.settings.worker_offline_after)
        except RedisError as exc:
            raise explain(exc, self.settings) from None
        engine = self.engine_of(queue)
        if live and engine not in live:
            served = ", ".join(sorted(live))
            var = "WORKER_BACKEND_" + queue.upper().replace("-", "_")
            raise EngineMismatch(
                f"queue {queue!r} is served by {served} workers, but this producer is set to {engine}: "
                f"set {var}={served} here, or restart the workers with --backend {engine}"
            )
        self._engine_checked[queue] = time.monotonic()

    def _envelope(self, task: str | Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  queue: str | None, job_id: str | None, options: RouteOptions = None) -> tuple[Envelope, str, str]:
        """The message of one new job, with a fresh run token, and its fallback; raises (writing
        nothing) for an invalid id or option, an unknown task, arguments that cannot travel or
        are too big or too deep."""
        if job_id is not None:
            validate_job_id(job_id)
        spec = self.registry.task(task, queue)
        pq = self.queue(spec.queue)
        priority, group, selector, fallback, tags, timeout, max_tries = (*(options or ()), None, None, None, None,
                                                                          None, None, None)[:7]
        route = pq.route(spec, priority, group, selector, fallback)
        if timeout is not None:
            timeout = validate_timeout(timeout)
            if timeout > pq.config.longest_timeout:
                raise InvalidOption(f"_timeout={timeout:g} is over queue {spec.queue!r}'s longest task timeout "
                                    f"({pq.config.longest_timeout:g}s), which workers enforce as a backstop: raise "
                                    "the task's timeout (@task(timeout=...)) or WORKER_TIMEOUT_SECONDS")
        if max_tries is not None and (isinstance(max_tries, bool) or not isinstance(max_tries, int)
                                      or not 1 <= max_tries <= 1000):
            raise InvalidOption(f"_max_tries={max_tries!r} is invalid: use an integer from 1 to 1000")
        env = Envelope(job_id or new_job_id(), spec.name, spec.queue, list(args), kwargs, 1, now_ms(), new_run(),
                       route.priority, route.group, route.selector, route.needed or pq.config.routed,
                       check_tags(tags, "_tags") if tags is not None else {}, spec.rate_limit is not None,
                       timeout, max_tries)
        raw = env.encode()
        if "\\ud" in raw:  # a lone surrogate ("\ud800") passes json.dumps, but no Lua script can read it
            try:
                json.dumps(json.loads(raw), ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise PayloadError(f"arguments of {spec.name!r} hold a lone surrogate (text that is not valid "
                                   "Unicode, e.g. from os.fsdecode): encode it, or pass bytes as base64") from None
        if raw.count("[") + raw.count("{") > MAX_DEPTH:  # only then can an argument be too deep
            for value in (*env.args, *env.kwargs.values()):
                check_depth(value, MAX_DEPTH)
        if len(raw) > self.settings.worker_max_payload_bytes:
            raise PayloadError(
                f"job for {spec.name!r} is {len(raw)} bytes, over WORKER_MAX_PAYLOAD_BYTES="
                f"{self.settings.worker_max_payload_bytes}: pass a reference (a key, a path) instead of the data"
            )
        return env, raw, route.fallback

    async def enqueue(
        self, task: str | Callable[..., Any], *args: Any, _queue: str | None = None,
        _job_id: str | None = None, _delay: float | None = None, _priority: str | None = None,
        _worker_group: str | None = None, _worker_selector: Mapping[str, str] | None = None,
        _fallback: str | None = None, _tags: Mapping[str, str] | None = None, _timeout: float | None = None,
        _max_tries: int | None = None, **kwargs: Any,
    ) -> Job:
        """Enqueue one job. Routing options (see ``app.components.worker.routing``): ``_priority``
        ("high"/"low"), ``_worker_group`` or ``_worker_selector`` (a target), ``_fallback``
        ("wait"/"fail"/"cancel" when no healthy target worker exists), ``_tags`` (str -> str,
        shown in the job's events and result). ``_timeout`` / ``_max_tries``: this job's own timeout
        per attempt and attempts, over the task's (a timeout at most the queue's longest)."""
        delay = validate_delay(_delay) if _delay is not None else 0.0
        env, raw, fallback = self._envelope(task, args, kwargs, _queue, _job_id,
                                            (_priority, _worker_group, _worker_selector, _fallback, _tags,
                                             _timeout, _max_tries))
        await self._check_engine(env.queue)
        engine = self.engine_of(env.queue)
        chain = self._chain(env.queue)
        view = self._hook_view(env, _delay)
        await chain.call("before_enqueue", view, job_id=env.id)
        try:
            (flag,) = await self._accept([Accepting(env, raw, _delay_ms(delay), engine, _job_id is not None, fallback)])
        except RedisError as exc:
            raise self._refused(exc) from None
        if not flag:
            raise DuplicateJob(
                f"job id {env.id!r} is already queued or running: not enqueued again "
                "(wait for it to finish or choose another id)"
            )
        await chain.call("after_enqueue", view, job_id=env.id)
        return Job(self, env.id, env.queue, env.task)

    async def enqueue_many(self, requests: Iterable[JobRequest]) -> list[Job | None]:
        """Enqueue many jobs: all are validated and encoded first, then sent in chained chunks
        (components/worker/bulk.py), each chunk one atomic script call.

        Returns a handle per request, in order; ``None`` where a caller-chosen id was refused
        because that job is still queued or running (or appears earlier in the same batch).
        Raises before writing anything when any request is invalid (unknown task, bad
        arguments, oversized payload, bad delay or id). If Redis refuses a chunk (out of
        memory), that chunk and the rest are not enqueued, and the error says how many earlier
        jobs were accepted (they will run).
        """
        if self._bulk is None:
            self._bulk = Bulk(self)
        return await self._bulk.enqueue_many(requests)

    async def _accept(self, jobs: list[Accepting]) -> list[int]:
        """Record jobs and make them deliverable in one script call (enqueue.lua): per job
        1 accepted, 2 accepted by an earlier try of this very call (its reply was lost),
        0 refused (its id is queued, delayed or running). A refused job writes nothing.

        The engine's commands are recorded from its adapter's ``stage`` and replayed by the
        script: per job for a caller-chosen id (run only if that job is accepted), and once per
        queue for fresh ids, which cannot be refused (one batch, as the engine stages it)."""
        if self.keys.cluster and len({job.env.queue for job in jobs}) > 1:
            return await self._accept_per_queue(jobs)
        keys = self.queue(jobs[0].env.queue).keys if jobs else self.keys  # one slot per call on Cluster
        recorder = self._recorder.pipeline(transaction=False)  # collects an engine's commands, never executed

        async def staged(queue: str, messages: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
            await self._adapter(queue).stage(recorder, messages)
            commands = [words for words, _ in recorder.command_stack]
            recorder.command_stack.clear()
            return commands

        healthy_ms = int(self.settings.worker_warning_after * 1000)
        dead_ttl = self.settings.worker_dead_ttl_seconds
        batched: dict[str, list[tuple[str, str]]] = {}
        shapes: dict[tuple[Any, ...], int] = {}  # what jobs share, sent once per call (enqueue.lua)
        per_job: list[Any] = []
        for job in jobs:
            env, raw, delay_ms = job.env, job.raw, job.delay_ms
            pq = self.queue(env.queue)
            commands: list[tuple[Any, ...]] = []
            engine_path = not delay_ms and not env.routed
            if engine_path and job.chosen:
                commands = await staged(env.queue, [(env.message_id, raw)])
            elif engine_path:
                batched.setdefault(env.queue, []).append((env.message_id, raw))
            shape = (env.task, env.queue, job.engine, keys.delayed(env.queue) if delay_ms else "",
                     keys.delayed_wake(env.queue) if delay_ms else "", int(engine_path and not job.chosen),
                     pq.prefix, int(env.routed), env.priority, env.group, env.selector,
                     env.task if env.limited else "", job.fallback, healthy_ms,
                     max(pq.config.keep_result, 1), dead_ttl, env.tags_text if env.tags else "", int(job.chosen))
            number = shapes.get(shape)
            if number is None:
                number = shapes[shape] = len(shapes) + 1
            per_job += [env.id, env.run, raw, number, delay_ms, len(commands)]
            for words in commands:
                per_job += [len(words), *words]
        args: list[Any] = [self.settings.worker_events_maxlen, keys.job(""), keys.result(""),
                           keys.instances, len(shapes)]
        for shape in shapes:
            args += shape
        args.append(len(jobs))
        args += per_job
        args.append(len(batched))
        for queue, messages in batched.items():
            block = await staged(queue, messages)
            args += [self.queue(queue).prefix, len(block)]
            for words in block:
                args += [len(words), *words]
        # EVALSHA packed by hiredis (redis-py's packing of a 1000-job call costs more than its
        # Redis time); the script is loaded once on NOSCRIPT (a Redis restart); a call resent
        # after a lost reply is recognised by its run tokens.
        if self.settings.redis_wait_replicas:  # WAIT on the script's own connection: see core/redis_wait.py
            reply, acked = await call_script(self._enqueue_script, [keys.events], args,
                                             then=("WAIT", self.settings.redis_wait_replicas,
                                                   self.settings.redis_wait_timeout_ms))
            redis_wait.check(reply, int(acked), [job.env.id for job in jobs], self.settings)
        else:
            reply = await call_script(self._enqueue_script, [keys.events], args)
        return [1 if int(flag) else 0 for flag in reply]  # 3 (ended by its fallback) was accepted too

    async def _accept_per_queue(self, jobs: list[Accepting]) -> list[int]:
        """Redis Cluster: one script call per queue (each queue's keys share one slot), the
        flags returned in the jobs' order. Atomic per queue, not across queues."""
        by_queue: dict[str, list[int]] = {}
        for n, job in enumerate(jobs):
            by_queue.setdefault(job.env.queue, []).append(n)
        flags = [0] * len(jobs)
        for indexes in by_queue.values():
            for n, flag in zip(indexes, await self._accept([jobs[n] for n in indexes]), strict=True):
                flags[n] = flag
        return flags

    async def locate(self, job_id: str) -> str | None:
        """Redis Cluster: the queue whose keys hold job ``job_id`` (its record or its result),
        looked up in every queue of the registry (one EXISTS per queue, one pipeline); None
        when no queue has it. Job ids stay as they are, so code that keeps only an id works."""
        queues = sorted(self.registry.queues)
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                keys = self.keys.for_queue(queue)
                pipe.exists(keys.job(job_id), keys.result(job_id))
            found = await pipe.execute()
        return next((queue for queue, count in zip(queues, found, strict=True) if int(count)), None)

    async def keys_of(self, job_id: str, queue: str | None) -> tuple[Keys, str | None]:
        """The keys a job's record and result live under, and its queue when known (located by
        id on Cluster; on a single Redis every queue shares the same job keys)."""
        if not self.keys.cluster:
            return self.keys, queue
        if queue is None:
            queue = await self.locate(job_id)
        return (self.keys.for_queue(queue) if queue else self.keys), queue

    def _refused(self, exc: RedisError, accepted: int = 0, total: int = 1) -> AppError:
        """One line naming why Redis refused an enqueue, never the payload it carried."""
        if not isinstance(exc, ResponseError):
            return explain(exc, self.settings)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        if first.startswith("OOM") or "maxmemory" in first:
            cause = "it is out of memory (maxmemory reached): free memory, raise maxmemory or consume jobs"
        else:
            cause = f"{first[:200]}"
        if accepted:
            outcome = f"{accepted} of {total} jobs were accepted before that and will run; the rest were not enqueued"
        else:
            outcome = "nothing was enqueued"
        return RedisUnavailable(f"Redis at {describe(self.settings)} refused the enqueue, {outcome}: {cause}")

    def job(self, job_id: str) -> Job:
        """A handle on a job by id; an id no enqueue could have accepted raises InvalidOption."""
        return Job(self, validate_job_id(job_id))

    async def close(self) -> None:
        for adapter in self._adapters.values():
            try:
                await adapter.close()
            except Exception:  # noqa: BLE001
                pass
        await self.redis.aclose()


@dataclass(frozen=True, init=False)
class JobRequest:
    """One job for ``enqueue_many``."""

    task: str | Callable[..., Any]
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    job_id: str | None = None
    delay: float | None = None
    priority: str | None = None
    worker_group: str | None = None
    worker_selector: Mapping[str, str] | None = None
    fallback: str | None = None
    tags: Mapping[str, str] | None = None
    timeout: float | None = None
    max_tries: int | None = None

    def __init__(self, task: str | Callable[..., Any], args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                 queue: str | None = None, job_id: str | None = None, delay: float | None = None,
                 priority: str | None = None, worker_group: str | None = None,
                 worker_selector: Mapping[str, str] | None = None, fallback: str | None = None,
                 tags: Mapping[str, str] | None = None, timeout: float | None = None,
                 max_tries: int | None = None) -> None:
        # The dataclass's own __init__ of a frozen class sets each field through
        # object.__setattr__: 2.7 us of the ~20 a bulk-enqueued job may cost; one update, 1 us.
        self.__dict__.update(task=task, args=args, kwargs={} if kwargs is None else kwargs, queue=queue,
                             job_id=job_id, delay=delay, priority=priority, worker_group=worker_group,
                             worker_selector=worker_selector, fallback=fallback, tags=tags, timeout=timeout,
                             max_tries=max_tries)


class Job:
    """A handle on one job, by id."""

    __slots__ = ("client", "job_id", "queue", "task")  # a bulk enqueue returns one per job

    def __init__(self, client: WorkerClient, job_id: str, queue: str | None = None, task: str | None = None) -> None:
        self.client = client
        self.job_id = job_id
        self.queue = queue
        self.task = task

    def __repr__(self) -> str:
        return f"<Job {self.job_id} {self.task or ''} on {self.queue or '?'}>"

    async def _keys(self) -> Keys:
        keys, self.queue = await self.client.keys_of(self.job_id, self.queue)
        return keys

    async def status(self) -> str:
        """queued, delayed, running, completed, failed, cancelled, or unknown."""
        status = await read_status(self.client.redis, await self._keys(), self.job_id)
        if status is None:
            record = await self.info()
            return record["status"] if record else "unknown"
        return status

    async def info(self) -> dict[str, Any] | None:
        """The result record (status, result or error, attempts, timings), once finished."""
        return await read_result(self.client.redis, await self._keys(), self.job_id)

    async def result(self, timeout: float | None = None) -> Any:
        """The job's return value; raises JobFailed with the job's error, ResultTimeout, or
        JobNotFound for an unknown or expired id."""
        if timeout is not None:
            timeout = validate_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            record = await self.info()
            if record is not None:
                if record["status"] == "completed":
                    return record["result"]
                raise JobFailed(self.job_id, record.get("error_type") or "Error", record.get("error") or "")
            if await read_status(self.client.redis, await self._keys(), self.job_id) is None:
                raise JobNotFound(f"no job {self.job_id!r}: unknown id, or its result expired")
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"job {self.job_id} did not finish within {timeout:g}s")
            wait = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(wait)
            pause = min(pause * 1.5, 0.25)


class _Portal:
    """A private event loop on a daemon thread, so sync code can use the async client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="worker-client", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class SyncWorkerClient:
    """The same client for sync code (scripts, Django views, the CLI)."""

    def __init__(self, settings: Settings | None = None, registry: Registry | None = None) -> None:
        self._portal = _Portal()

        async def build() -> WorkerClient:
            return WorkerClient(settings, registry)

        self.client = self._portal.call(build())

    def enqueue(self, task: str | Callable[..., Any], *args: Any, **kwargs: Any) -> SyncJob:
        return SyncJob(self, self._portal.call(self.client.enqueue(task, *args, **kwargs)))

    def enqueue_many(self, requests: Iterable[JobRequest]) -> list[SyncJob | None]:
        """``WorkerClient.enqueue_many`` for sync code: a handle per request, None where refused."""
        jobs = self._portal.call(self.client.enqueue_many(list(requests)))
        return [SyncJob(self, job) if job is not None else None for job in jobs]

    def job(self, job_id: str) -> SyncJob:
        return SyncJob(self, self.client.job(job_id))

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._portal.call(coro)

    def close(self) -> None:
        self._portal.call(self.client.close())
        self._portal.loop.call_soon_threadsafe(self._portal.loop.stop)


class SyncJob:
    def __init__(self, owner: SyncWorkerClient, job: Job) -> None:
        self._owner = owner
        self.job = job
        self.job_id = job.job_id

    def status(self) -> str:
        return self._owner.call(self.job.status())

    def info(self) -> dict[str, Any] | None:
        return self._owner.call(self.job.info())

    def result(self, timeout: float | None = None) -> Any:
        return self._owner.call(self.job.result(timeout))


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WorkerClient] = weakref.WeakKeyDictionary()
_sync_client: SyncWorkerClient | None = None
_sync_lock = threading.Lock()


def default_client() -> WorkerClient:
    """The client of the running event loop, built from settings on first use."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = WorkerClient()
    return client


def default_sync_client() -> SyncWorkerClient:
    global _sync_client
    with _sync_lock:
        if _sync_client is None:
            _sync_client = SyncWorkerClient()
        return _sync_client


async def enqueue(task: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
    return await default_client().enqueue(task, *args, **kwargs)


def enqueue_sync(task: str | Callable[..., Any], *args: Any, **kwargs: Any) -> SyncJob:
    return default_sync_client().enqueue(task, *args, **kwargs)


__all__ = [
    "AppError", "DuplicateJob", "EngineMismatch", "InvalidOption", "Job", "JobRequest", "JobFailed", "JobNotFound",
    "PayloadError", "RedisUnavailable", "ResultTimeout",
    "SyncJob", "SyncWorkerClient", "WorkerClient", "default_client", "enqueue", "enqueue_sync",
]
