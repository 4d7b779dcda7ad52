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
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from app.components.worker import config as queue_config
from app.components.worker.engine_switch import live_engine_beats
from app.components.worker.engines import engine_class
from app.components.worker.engines.base import EngineAdapter
from app.components.worker.envelope import Envelope, new_job_id, now_ms
from app.components.worker.keys import Keys
from app.components.worker.middleware import MiddlewareChain, load_middleware
from app.components.worker.registry import Registry
from app.components.worker.runtime import scripts
from app.components.worker.runtime.store import read_result, read_status
from app.core.errors import DuplicateJob, EngineMismatch, JobFailed, JobNotFound, PayloadError, ResultTimeout
from app.core.redis import async_client, explain
from app.core.settings import Settings, get_settings

T = TypeVar("T")
ENGINE_CHECK_TTL_S = 2.0


class WorkerClient:
    """Enqueues jobs and reads their state; one per event loop."""

    def __init__(self, settings: Settings | None = None, registry: Registry | None = None) -> None:
        self.settings = settings or get_settings()
        self.registry = registry or Registry.discover(self.settings.queue_packages)
        self.keys = Keys(self.settings.worker_key_prefix)
        self.redis = async_client(self.settings)
        self._enqueue_script = self.redis.register_script(scripts.source("enqueue"))
        self._enqueue_loaded = False
        self._adapters: dict[tuple[str, str], EngineAdapter] = {}
        self._global_middleware = load_middleware(self.settings.middleware_paths)
        self._chains: dict[str, MiddlewareChain] = {}
        self._engine_checked: dict[str, float] = {}
        self._live: dict[str, dict[str, int]] = {}

    def engine_of(self, queue: str) -> str:
        """The explicit engine (flag, WORKER_BACKEND*, WorkerSettings.backend), else the one the
        queue's live workers announced at the last ``_check_engine``, else the default."""
        explicit = queue_config.explicit_engine_for(self.registry.queue(queue), self.settings)
        return queue_config.choose_engine(explicit, self._live.get(queue, {}), self.settings.worker_backend)

    def _chain(self, queue: str) -> MiddlewareChain:
        """Producer-side hooks (before/after enqueue): global middleware, then the queue's."""
        if queue not in self._chains:
            self._chains[queue] = MiddlewareChain([*self._global_middleware, *self.registry.queue(queue).middleware])
        return self._chains[queue]

    @staticmethod
    def _hook_view(env: Envelope, delay: float | None) -> dict[str, Any]:
        return {"job_id": env.id, "task": env.task, "queue": env.queue, "args": env.args,
                "kwargs": env.kwargs, "delay": delay}

    def _adapter(self, queue: str) -> EngineAdapter:
        engine = self.engine_of(queue)
        if (queue, engine) not in self._adapters:
            cfg = queue_config.with_engine(queue_config.resolve(self.registry.queue(queue), self.settings), engine)
            self._adapters[(queue, engine)] = engine_class(engine)(self.settings, self.keys, cfg)
        return self._adapters[(queue, engine)]

    async def _check_engine(self, queue: str) -> None:
        """Learn the engines the queue's live workers announce (``engine_of`` follows them when
        nothing explicit is set); refuse an explicit engine that no live worker reads."""
        checked = self._engine_checked.get(queue)
        if checked is not None and time.monotonic() - checked < ENGINE_CHECK_TTL_S:
            return
        try:
            self._live[queue] = live = await live_engine_beats(
                self.redis, self.keys, queue, self.settings.worker_offline_after)
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
                  queue: str | None, job_id: str | None) -> tuple[Envelope, str]:
        spec = self.registry.task(task, queue)
        env = Envelope(job_id or new_job_id(), spec.name, spec.queue, list(args), kwargs, 1, now_ms())
        raw = env.encode()
        if len(raw) > self.settings.worker_max_payload_bytes:
            raise PayloadError(
                f"job for {spec.name!r} is {len(raw)} bytes, over WORKER_MAX_PAYLOAD_BYTES="
                f"{self.settings.worker_max_payload_bytes}: pass a reference (a key, a path) instead of the data"
            )
        return env, raw

    async def enqueue(
        self, task: str | Callable[..., Any], *args: Any, _queue: str | None = None,
        _job_id: str | None = None, _delay: float | None = None, **kwargs: Any,
    ) -> Job:
        env, raw = self._envelope(task, args, kwargs, _queue, _job_id)
        await self._check_engine(env.queue)
        engine = self.engine_of(env.queue)
        due = now_ms() + int(_delay * 1000) if _delay and _delay > 0 else 0
        chain = self._chain(env.queue)
        view = self._hook_view(env, _delay)
        await chain.call("before_enqueue", view, job_id=env.id)
        try:
            if _job_id is None and not due:
                # A fresh id cannot be a duplicate: record and send in one round trip.
                await self._pipelined(lambda pipe: self._record_and_stage(pipe, env, raw, engine),
                                      transaction=True)
            else:
                if not (await self._record(self.redis, env.queue, engine, [(env, raw, due)]))[0]:
                    raise DuplicateJob(
                        f"job id {env.id!r} is already queued or running: not enqueued again "
                        "(wait for it to finish or choose another id)"
                    )
                if not due:
                    try:
                        await self._adapter(env.queue).send([(env.message_id, raw)])
                    except BaseException:
                        await self.redis.delete(self.keys.job(env.id))
                        raise
        except RedisError as exc:
            raise explain(exc, self.settings) from None
        await chain.call("after_enqueue", view, job_id=env.id)
        return Job(self, env.id, env.queue, env.task)

    async def enqueue_many(self, requests: Iterable[JobRequest]) -> list[Job | None]:
        """Enqueue many jobs with one pipeline for the records and one batch per engine.

        Returns a handle per request, in order; ``None`` where a caller-chosen id was
        refused because that job is still queued or running. Raises before writing anything
        when any request is invalid (unknown task, bad arguments, oversized payload).
        """
        prepared = []
        chosen_ids = []
        for req in requests:
            chosen_ids.append(req.job_id)
            env, raw = self._envelope(req.task, tuple(req.args), dict(req.kwargs), req.queue, req.job_id)
            await self._check_engine(env.queue)
            due = now_ms() + int(req.delay * 1000) if req.delay and req.delay > 0 else 0
            prepared.append((env, raw, due, self.engine_of(env.queue)))
        for env, _, _, _ in prepared:
            chain = self._chain(env.queue)
            if chain.has("before_enqueue"):
                await chain.call("before_enqueue", self._hook_view(env, None), job_id=env.id)
        try:
            fresh = all(job_id is None for job_id in chosen_ids)
            groups: dict[tuple[str, str], list[int]] = {}
            for index, (env, _, _, engine) in enumerate(prepared):
                groups.setdefault((env.queue, engine), []).append(index)
            async def build(pipe: Pipeline) -> None:
                for (queue, engine), indexes in groups.items():
                    await self._record(pipe, queue, engine, [prepared[i][:3] for i in indexes])
                if fresh:  # no id can be a duplicate: records and messages in one round trip
                    for queue, messages in self._immediate(prepared).items():
                        await self._adapter(queue).stage(pipe, messages)

            replies = await self._pipelined(build, transaction=False)
            recorded = [0] * len(prepared)
            for reply, indexes in zip(replies, groups.values(), strict=False):
                for index, flag in zip(indexes, reply, strict=True):
                    recorded[index] = int(flag)
            if not fresh:
                accepted = [p for p, ok in zip(prepared, recorded, strict=True) if int(ok)]
                for queue, messages in self._immediate(accepted).items():
                    await self._adapter(queue).send(messages)
        except RedisError as exc:
            raise explain(exc, self.settings) from None
        for (env, _, _, _), ok in zip(prepared, recorded, strict=False):
            chain = self._chain(env.queue)
            if int(ok) and chain.has("after_enqueue"):
                await chain.call("after_enqueue", self._hook_view(env, None), job_id=env.id)
        return [Job(self, env.id, env.queue, env.task) if int(ok) else None
                for (env, _, _, _), ok in zip(prepared, recorded, strict=False)]

    async def _record(self, client: Any, queue: str, engine: str, jobs: list[tuple[Envelope, str, int]]) -> Any:
        """The layer's records of new jobs of one queue, with their job.enqueued events, in one
        script call on a client (returns a flag per job) or a pipeline."""
        args: list[Any] = [self.keys.prefix, now_ms(), self.settings.worker_events_maxlen, engine, queue]
        for env, raw, due in jobs:
            args += [env.id, raw, env.task, due]
        keys = [self.keys.delayed(queue), self.keys.events]
        if isinstance(client, Pipeline):
            # EVALSHA of a script loaded once: a registered Script in a pipeline makes redis-py
            # send SCRIPT EXISTS first, one more round trip on every enqueue.
            if not self._enqueue_loaded:
                await self.redis.script_load(self._enqueue_script.script)
                self._enqueue_loaded = True
            return client.evalsha(self._enqueue_script.sha, len(keys), *keys, *args)
        return await self._enqueue_script(keys=keys, args=args, client=client)

    async def _record_and_stage(self, pipe: Pipeline, env: Envelope, raw: str, engine: str) -> None:
        await self._record(pipe, env.queue, engine, [(env, raw, 0)])
        await self._adapter(env.queue).stage(pipe, [(env.message_id, raw)])

    async def _pipelined(self, build: Callable[[Pipeline], Awaitable[None]], *, transaction: bool) -> list[Any]:
        """Run a pipeline; if Redis lost its script cache (a restart), load the script and run
        it again (the record script recognises its own retry; a duplicate message is skipped
        at claim)."""
        for attempt in (1, 2):
            async with self.redis.pipeline(transaction=transaction) as pipe:
                await build(pipe)
                try:
                    return await pipe.execute()  # type: ignore[no-any-return]
                except NoScriptError:
                    self._enqueue_loaded = False
                    if attempt == 2:
                        raise
                    await self.redis.script_load(self._enqueue_script.script)
                    self._enqueue_loaded = True
        raise AssertionError("unreachable")

    @staticmethod
    def _immediate(prepared: list[tuple[Envelope, str, int, str]]) -> dict[str, list[tuple[str, str]]]:
        by_queue: dict[str, list[tuple[str, str]]] = {}
        for env, raw, due, _ in prepared:
            if not due:
                by_queue.setdefault(env.queue, []).append((env.message_id, raw))
        return by_queue

    def job(self, job_id: str) -> Job:
        return Job(self, job_id)

    async def close(self) -> None:
        for adapter in self._adapters.values():
            try:
                await adapter.close()
            except Exception:  # noqa: BLE001
                pass
        await self.redis.aclose()


@dataclass(frozen=True)
class JobRequest:
    """One job for ``enqueue_many``."""

    task: str | Callable[..., Any]
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    job_id: str | None = None
    delay: float | None = None


class Job:
    """A handle on one job, by id."""

    def __init__(self, client: WorkerClient, job_id: str, queue: str | None = None, task: str | None = None) -> None:
        self.client = client
        self.job_id = job_id
        self.queue = queue
        self.task = task

    def __repr__(self) -> str:
        return f"<Job {self.job_id} {self.task or ''} on {self.queue or '?'}>"

    async def status(self) -> str:
        """queued, delayed, running, completed, failed, cancelled, or unknown."""
        status = await read_status(self.client.redis, self.client.keys, self.job_id)
        if status is None:
            record = await self.info()
            return record["status"] if record else "unknown"
        return status

    async def info(self) -> dict[str, Any] | None:
        """The result record (status, result or error, attempts, timings), once finished."""
        return await read_result(self.client.redis, self.client.keys, self.job_id)

    async def result(self, timeout: float | None = None) -> Any:
        """The job's return value; raises JobFailed with the job's error, ResultTimeout, or
        JobNotFound for an unknown or expired id."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            record = await self.info()
            if record is not None:
                if record["status"] == "completed":
                    return record["result"]
                raise JobFailed(self.job_id, record.get("error_type") or "Error", record.get("error") or "")
            if await read_status(self.client.redis, self.client.keys, self.job_id) is None:
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
    "DuplicateJob", "EngineMismatch", "Job", "JobRequest", "JobFailed", "JobNotFound", "PayloadError", "ResultTimeout",
    "SyncJob", "SyncWorkerClient", "WorkerClient", "default_client", "enqueue", "enqueue_sync",
]
