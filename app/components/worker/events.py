"""Lifecycle events in one Redis Stream: the publisher, its middleware, and a reader.

Two roads, by what an event reports:

- A job's lifecycle events (``job.started``, ``job.completed``, ``job.retried``,
  ``job.failed`` carrying a job id) are held per job until the runtime takes them into the
  Lua script that changes that job's state. They are written by that script or not at all:
  a finish refused because another worker redelivered the job (a partition), or retried
  after its reply was lost, can never leave a second terminal event.
- Everything else (worker events, a malformed message with no job id) goes to an
  in-memory buffer that a background task writes in batches (one pipeline for many
  XADDs). Publishing never costs a round trip. When Redis is down the buffer keeps up to
  ``max_buffer`` events and retries with backoff; events that still cannot be written are
  counted in ``dropped`` and logged, never lost silently.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from app.components.worker.envelope import now_ms
from app.components.worker.keys import Keys
from app.components.worker.middleware import Middleware
from app.components.worker.runtime.context import JobContext, WorkerContext
from app.components.worker.runtime.policy import describe_error

logger = logging.getLogger(__name__)

FIELDS = ("type", "ts", "queue", "backend", "job_id", "task", "attempt", "worker_id", "duration_ms", "error")
TYPES = ("worker.started", "worker.stopped", "job.enqueued", "job.started", "job.completed",
         "job.retried", "job.failed",
         "schedule.fired", "schedule.skipped", "schedule.missed")  # written by app/components/scheduler/lua/claim.lua
# Written only by the script that changes the job's state (see the module docstring).
JOB_STATE_TYPES = frozenset({"job.started", "job.completed", "job.retried", "job.failed"})


class EventPublisher:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, maxlen: int, *, batch: int = 500,
        interval: float = 0.01, max_buffer: int = 100_000,
    ) -> None:
        self.redis = redis
        self.stream = keys.events
        self.maxlen = maxlen
        self.batch = batch
        self.interval = interval
        self.max_buffer = max_buffer
        self.buffer: deque[dict[str, str]] = deque()
        self.held: dict[str, list[dict[str, str]]] = {}
        self.sent = 0
        self.dropped = 0
        self.refused = 0  # job events whose state change was refused (another worker owns the job)
        self.failures = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def emit(self, type_: str, **fields: Any) -> None:
        event = {name: "" for name in FIELDS}
        event["type"] = type_
        event["ts"] = str(now_ms())
        for name, value in fields.items():
            event[name] = "" if value is None else str(value)
        if event["job_id"] and type_ in JOB_STATE_TYPES:
            self.held.setdefault(event["job_id"], []).append(event)
            return
        self._append(event)

    def _append(self, event: dict[str, str]) -> None:
        if len(self.buffer) >= self.max_buffer:
            self.buffer.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error("event buffer full: %d events dropped so far (Redis unreachable?)", self.dropped)
        self.buffer.append(event)
        if len(self.buffer) >= self.batch:
            self._wake.set()

    def take(self, job_id: str) -> list[dict[str, str]]:
        """Hand one job's held events to the runtime, for the Lua script of that job's state
        change. They are the runtime's from now on: it retries the same write with them, and
        reports with ``settled`` whether the script wrote them. Never written in the background."""
        return self.held.pop(job_id, [])

    def settled(self, events: list[dict[str, str]], written: bool) -> None:
        """The state change that carried ``events`` ended: written, or refused (the job is no
        longer this attempt's; whoever changed it wrote its own events)."""
        if written:
            self.sent += len(events)
        elif events:
            self.refused += len(events)
            logger.info("job %s: state change refused, its %d event(s) not written (another worker "
                        "ended or moved the job)", events[0]["job_id"], len(events))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                while self.buffer:
                    await self._flush_batch()
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis trouble must not stop the publisher
                self.failures += 1
                logger.warning("cannot publish %d events (%s); retrying in %.1fs", len(self.buffer), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
            if self._closing and not self.buffer:
                return

    async def _flush_batch(self) -> None:
        # The chunk leaves the buffer before the round trip, so that a ``take`` meanwhile (a
        # job writing its state) neither writes these events a second time nor has events
        # emitted after it removed in their place; on failure they go back to the front.
        chunk = [self.buffer.popleft() for _ in range(min(self.batch, len(self.buffer)))]
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for event in chunk:
                    pipe.xadd(self.stream, event, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                await pipe.execute()
        except BaseException:
            self.buffer.extendleft(reversed(chunk))
            raise
        self.sent += len(chunk)

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered (within ``timeout``), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # an interrupted batch is back in the buffer
            if self.buffer:
                self.dropped += len(self.buffer)
                logger.error("%d events could not be written before exit", len(self.buffer))


class EventPublishMiddleware(Middleware):
    """Turns the lifecycle hooks into events; the first user of the middleware API.

    ``job.started`` is not emitted here: the claim script writes it together with the
    attempt count, so a worker killed mid-job can never leave an attempt without it.
    Terminal and retry events are held by these hooks and written by the runtime in the
    Lua script of the job's state change, or not at all (see ``EventPublisher``).
    """

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher

    def _job(self, type_: str, job: JobContext, **extra: Any) -> None:
        if job.tags:
            extra["tags"] = ",".join(f"{k}={v}" for k, v in sorted(job.tags.items()))
        self.publisher.emit(
            type_, queue=job.queue, backend=job.engine, job_id=job.job_id, task=job.task,
            attempt=job.attempt, worker_id=job.worker_id, **extra,
        )

    def worker_start(self, worker: WorkerContext) -> None:
        self.publisher.emit("worker.started", queue=worker.queue, backend=worker.engine, worker_id=worker.worker_id)

    def worker_stop(self, worker: WorkerContext) -> None:
        self.publisher.emit("worker.stopped", queue=worker.queue, backend=worker.engine, worker_id=worker.worker_id)

    def after_process(self, job: JobContext, result: Any) -> None:
        self._job("job.completed", job, duration_ms=job.duration_ms())

    def on_retry(self, job: JobContext, error: BaseException, delay: float) -> None:
        self._job("job.retried", job, duration_ms=job.duration_ms(), error=_error(error))

    def on_failure(self, job: JobContext, error: BaseException) -> None:
        self._job("job.failed", job, duration_ms=job.duration_ms(), error=_error(error))


def _error(exc: BaseException) -> str:
    kind, message = describe_error(exc)
    return f"{kind}: {message}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(fields: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }


async def read_events(
    redis: aioredis.Redis, keys: Keys, *, queue: str | None = None, type_: str | None = None,
    job_id: str | None = None, start: str = "0", follow: bool = False, block_ms: int = 1000,
    count: int = 500,
) -> AsyncIterator[dict[str, str]]:
    """Events oldest first from stream id ``start`` (exclusive), filtered; with ``follow``,
    keeps waiting for new ones. Each event carries its stream id under ``id``.

    ``start="$"`` means "only events from now on": it is resolved once to the id of the
    newest entry, because passing ``$`` to every XREAD would skip what was added between
    one XREAD returning empty and the next one being sent.

    On Redis Cluster, the deployment's ``Keys`` reads every queue's own stream (``read_events_of``)."""
    if keys.cluster and not keys.root:
        async for event in read_events_of(redis, keys, [], queue=queue, type_=type_, job_id=job_id, start=start,
                                          follow=follow, block_ms=block_ms, count=count):
            yield event
        return
    last = start
    if last == "$":
        newest = await redis.xrevrange(keys.events, count=1)
        last = _text(newest[0][0]) if newest else "0-0"
    while True:
        if follow:
            batches = await redis.xread({keys.events: last}, count=count, block=block_ms)
            entries = batches[0][1] if batches else []
        else:
            lower = "-" if last == "0" else f"({last}"
            entries = await redis.xrange(keys.events, min=lower, max="+", count=count)
        for entry_id, fields in entries:
            last = _text(entry_id)
            event = _decode(fields)
            if queue and event.get("queue") != queue:
                continue
            if type_ and event.get("type") != type_ and not event.get("type", "").startswith(type_ + "."):
                continue
            if job_id and event.get("job_id") != job_id:
                continue
            event["id"] = last
            yield event
        if not follow and len(entries) < count:
            return


async def read_events_of(
    redis: aioredis.Redis, keys: Keys, queues: list[str], *, queue: str | None = None, follow: bool = False,
    **options: Any,
) -> AsyncIterator[dict[str, str]]:
    """``read_events`` over a deployment: its one stream on a single Redis; on Redis Cluster,
    each queue's own stream (``queues``, e.g. the registry's, and those in ``Keys.queues``; or
    just ``queue``), merged by time.
    Without ``follow`` the streams are read to their end and merged by (ts, id); with it, one
    reader per queue hands events over as they come (each stream in its own order)."""
    if not keys.cluster:
        async for event in read_events(redis, keys, queue=queue, follow=follow, **options):
            yield event
        return
    names = [queue] if queue else sorted({*queues, *(_text(q) for q in await redis.smembers(keys.queues))})
    if not follow:
        streams = [[e async for e in read_events(redis, keys.for_queue(q), queue=queue, **options)] for q in names]
        for event in heapq.merge(*streams, key=lambda e: (int(e.get("ts") or 0), e["id"])):
            yield event
        return
    found: asyncio.Queue[dict[str, str] | BaseException] = asyncio.Queue()

    async def pump(name: str) -> None:
        try:
            async for event in read_events(redis, keys.for_queue(name), queue=queue, follow=True, **options):
                await found.put(event)
        except Exception as exc:  # noqa: BLE001 - the reader raises it
            await found.put(exc)

    tasks = [asyncio.create_task(pump(q), name=f"events-{q}") for q in names]
    try:
        while True:
            item = await found.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
