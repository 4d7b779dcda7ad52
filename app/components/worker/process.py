"""One worker process serving one queue on one engine, until asked to stop.

Order of a life: connect, start the trail (events, heartbeat), run ``on_startup``, start
the engine and the delayed-job mover; on stop: stop fetching, let running jobs finish
within the grace, hand back the rest, run ``on_shutdown``, publish ``worker.stopped``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import threading
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from app.components.worker.config import resolve
from app.components.worker.engine_switch import settle_engine
from app.components.worker.engines import engine_class
from app.components.worker.events import EventPublisher, EventPublishMiddleware
from app.components.worker.health import Heartbeat, default_worker_id
from app.components.worker.keys import Keys
from app.components.worker.middleware import MiddlewareChain, load_middleware
from app.components.worker.registry import Registry
from app.components.worker.routing.admit import Admitter
from app.components.worker.runtime.context import WorkerContext
from app.components.worker.runtime.delayed import LISTEN_S, DelayedMover
from app.components.worker.runtime.orphans import OrphanSweep
from app.components.worker.runtime.reaper import Reaper
from app.components.worker.runtime.store import JobStore
from app.components.worker.runtime.wrapper import JobRuntime
from app.core.redis import async_client, heartbeat_client, ping
from app.core.redis_cluster import refuse_engine
from app.core.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    queue: str
    backend: str | None = None
    threads: int | None = None
    worker_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    group: str | None = None
    scheduler: bool = False  # also run the schedules (app.components.scheduler) in this process


async def _call_hook(hook: Any, ctx: WorkerContext) -> None:
    result = hook(ctx)
    if inspect.isawaitable(result):
        await result


async def _step(what: str, step: Awaitable[Any]) -> None:
    """One step of a graceful stop; a failure is logged and the stop goes on."""
    try:
        await step
    except Exception as exc:  # noqa: BLE001
        logger.warning("while stopping: %s failed (%s: %s)", what, type(exc).__name__, exc)


async def serve(settings: Settings, registry: Registry, options: WorkerOptions, stop: asyncio.Event) -> None:
    spec = registry.queue(options.queue)
    config = resolve(spec, settings, backend=options.backend, threads=options.threads, processes=1,
                     group=options.group)
    worker_id = options.worker_id or settings.worker_id or default_worker_id()
    if settings.redis_cluster:
        refuse_engine(config.engine, spec.name)
    keys = Keys.from_settings(settings).for_queue(spec.name)  # on Cluster: every key under '{queue}'
    redis = async_client(settings)
    await ping(redis, settings)
    await settle_engine(redis, keys, settings, config, stop)  # one engine per queue; take over another's waiting jobs
    if settings.redis_cluster:  # where readers find this queue's stream and workers
        await redis.sadd(Keys.from_settings(settings).queues, spec.name)
    if config.routed:  # producers that do not know it (another deployment, an old one) route too
        await redis.hset(keys.route(spec.name), "routed", 1)

    publisher = EventPublisher(redis, keys, settings.worker_events_maxlen)
    publisher.start()
    worker = WorkerContext(queue=spec.name, engine=config.engine, worker_id=worker_id,
                           instance=f"{worker_id}~{uuid.uuid4().hex[:8]}")
    chain = MiddlewareChain([EventPublishMiddleware(publisher), *load_middleware(settings.middleware_paths),
                             *spec.middleware])
    store = JobStore(redis, keys, settings.worker_events_maxlen, settings.worker_dead_ttl_seconds)
    runtime = JobRuntime(spec, config, store, chain, worker, publisher)
    adapter = engine_class(config.engine)(settings, keys, config)
    labels = {**settings.labels, **options.labels}
    admitter = Admitter(store, runtime, config, labels, settings.worker_delay_poll_seconds)
    heartbeat = Heartbeat(
        heartbeat_client(settings), keys, settings, queue=spec.name, engine=config.engine, worker_id=worker_id, instance=worker.instance,
        labels=labels, group=config.group, concurrency=config.threads,
        counters=lambda: {"running": runtime.running, "done": runtime.done, "failed": runtime.failed},
        consumer=adapter.consumer_state,
    )
    mover = DelayedMover(store, spec.name, adapter.send, settings.worker_delay_poll_seconds, engine=config.engine,
                         worker_id=worker_id, waiter=async_client(settings),
                         listen=min(LISTEN_S, settings.redis_socket_timeout / 2), on_ready=admitter.wake,
                         group=config.group)
    reaper = Reaper(redis, keys, runtime, adapter, settings.worker_offline_after, heartbeat)
    orphans = OrphanSweep(redis, keys, runtime, settings.worker_offline_after, adapter)  # writes lost in a failover

    if spec.on_startup is not None:
        await _call_hook(spec.on_startup, worker)
    await asyncio.to_thread(heartbeat.beat)
    heartbeat.start()
    await chain.call("worker_start", worker)
    if not config.group:
        # A worker of a group runs only what targets its group (or its labels): it takes routed
        # jobs through its admitter and leaves the engine's queue, the default group's, alone.
        await adapter.start(runtime.execute, worker.instance)
    mover.start()
    admitter.start()
    reaper.start()
    orphans.start()
    flows = _start_workflows(settings, registry, worker.instance)  # advances workflow runs (app/components/workflows)
    scheduler = None
    if options.scheduler:
        from app.components.scheduler import Scheduler, collect

        scheduler = Scheduler(settings, collect(registry, settings.worker_schedules_file))
        scheduler.start()
    logger.info("worker %s serving queue %s on %s with %d slots (pid %d)",
                worker_id, spec.name, config.engine, config.threads, os.getpid())
    try:
        await stop.wait()
    finally:
        logger.info("worker %s stopping: finishing running jobs (grace %gs)", worker_id, settings.worker_shutdown_timeout)
        runtime.stopping = True
        if flows is not None:
            await _step("stop advancing workflows", flows.stop())
        if scheduler is not None:
            await _step("stop the scheduler", scheduler.stop())
        # Each step on its own: one Redis call that fails (a connection left dead by a
        # partition) must not skip the drain, the hand-backs or the last heartbeat.
        await _step("stop crash recovery", reaper.stop())
        await _step("stop the orphan sweep", orphans.stop())
        await _step("stop admitting routed jobs", admitter.stop())
        await _step("stop the delayed mover", mover.stop())
        await _step("stop fetching", adapter.stop_fetching())
        await _step("drain running jobs", runtime.drain(settings.worker_shutdown_timeout))
        await _step("close the engine", adapter.close())
        await _step("worker_stop middleware", chain.call("worker_stop", worker))
        if spec.on_shutdown is not None:
            await _step(f"on_shutdown of queue {spec.name}", _call_hook(spec.on_shutdown, worker))
        await _step("last heartbeat", heartbeat.stop())
        await _step("publish remaining events", publisher.close())
        runtime.close()
        await _step("close Redis", redis.aclose())
        logger.info("worker %s stopped: %d done, %d failed", worker_id, runtime.done, runtime.failed)


def _start_workflows(settings: Settings, registry: Registry, instance: str) -> Any:
    """The workflow reconciler of this process (WORKFLOW_RECONCILER=false: none; none on Redis
    Cluster, where workflows are refused: a run's steps span queues, hence slots)."""
    if not settings.workflow_reconciler or settings.redis_cluster:
        return None
    from app.components.worker.api import WorkerClient
    from app.components.workflows.reconciler import Reconciler

    return Reconciler(settings, WorkerClient(settings, registry), consumer=instance, own_client=True).start()


def run(settings: Settings, registry: Registry, options: WorkerOptions) -> None:
    """Serve in this process. The first SIGTERM/SIGINT/SIGHUP stops gracefully; a second
    exits at once. A graceful stop that cannot end (Redis gone while jobs wait to be handed
    back) is cut short ``STOP_MARGIN_S`` after the grace: a stop always ends."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_signal(signum: int) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                logger.warning("second %s: exiting now; running jobs return through crash recovery",
                               signal.Signals(signum).name)
                os._exit(1)
            limit = settings.worker_shutdown_timeout + STOP_MARGIN_S
            timer = threading.Timer(limit, _give_up, args=(limit,))
            timer.daemon = True
            timer.start()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig)
        await serve(settings, registry, options, stop)

    asyncio.run(main())


STOP_MARGIN_S = 15.0


def _give_up(limit: float) -> None:
    logger.error("graceful stop did not end within %gs: exiting; what was running returns through crash recovery",
                 limit)
    os._exit(1)
