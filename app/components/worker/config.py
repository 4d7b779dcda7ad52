"""The effective tuning of one queue: CLI flag > environment > WorkerSettings > default.

An option set in code on one task (``@task(max_tries=..., timeout=...)``) is more specific
and wins over all of these; that choice is made per job in the runtime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from app.components.worker.registry import QueueSpec
from app.core.settings import Settings

DEFAULT_THREADS = 10
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_TRIES = 3
DEFAULT_KEEP_RESULT = 3600


@dataclass(frozen=True)
class QueueConfig:
    name: str
    engine: str
    processes: int
    threads: int
    timeout: float
    max_tries: int
    keep_result: int
    backoff: float
    backoff_max: float
    longest_timeout: float = 0.0  # the queue's timeout or any task's own, whichever is longest
    max_concurrency: int = 0  # jobs of the queue running at once across all workers; 0: no limit
    group: str = ""  # the worker group this worker serves ('' = the default group)
    routed: bool = False  # every job of the queue goes through admission (see routing/)


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def explicit_engine_for(queue: QueueSpec, settings: Settings, cli_backend: str | None = None) -> str | None:
    """The engine someone chose for this queue, if anyone did:
    CLI > WORKER_BACKEND_<QUEUE> > WORKER_BACKEND (when set) > WorkerSettings.backend."""
    explicit_default = "worker_backend" in settings.model_fields_set
    return _first(  # type: ignore[no-any-return]
        cli_backend,
        settings.backend_for(queue.name),
        settings.worker_backend if explicit_default else None,
        queue.backend,
    )


def choose_engine(explicit: str | None, live: Iterable[str] | Mapping[str, int], default: str) -> str:
    """The engine a producer (or a reader of stats) uses for a queue.

    An explicit choice wins (a disagreement with live workers is refused elsewhere, with a
    message). With none, the producer follows the queue's live workers, so
    ``app worker q --backend dramatiq`` plus a bare ``app enqueue`` just works. ``live`` maps
    engine -> last beat (ms) or is a set; with several, the most recently announced wins
    (several engines live on one queue is refused at worker start, but can show for one
    heartbeat interval during a switch)."""
    if explicit:
        return explicit
    if isinstance(live, Mapping):
        if live:
            return max(live, key=lambda engine: (live[engine], engine))
        return default
    engines = sorted(live)
    return engines[0] if engines else default


def engine_for(queue: QueueSpec, settings: Settings, cli_backend: str | None = None) -> str:
    """The engine from settings alone: the explicit choice, else WORKER_BACKEND's default (arq)."""
    return explicit_engine_for(queue, settings, cli_backend) or settings.worker_backend


def with_engine(config: QueueConfig, engine: str) -> QueueConfig:
    return replace(config, engine=engine)


def _longest_timeout(queue: QueueSpec, timeout: float) -> float:
    return max([timeout, *(t.timeout for t in queue.tasks.values() if t.timeout)])


def resolve(
    queue: QueueSpec,
    settings: Settings,
    *,
    backend: str | None = None,
    processes: int | None = None,
    threads: int | None = None,
    group: str | None = None,
) -> QueueConfig:
    env_limit = settings.max_concurrency_for(queue.name)
    limit = int(_first(env_limit, queue.max_concurrency, 0))
    timeout = float(_first(settings.worker_timeout_seconds, queue.job_timeout, DEFAULT_TIMEOUT))
    return QueueConfig(
        name=queue.name,
        engine=engine_for(queue, settings, backend),
        processes=_first(processes, settings.worker_processes, 1),
        threads=_first(threads, settings.worker_threads, queue.max_jobs, DEFAULT_THREADS),
        timeout=timeout,
        max_tries=_first(settings.worker_max_tries, queue.max_tries, DEFAULT_MAX_TRIES),
        keep_result=_first(settings.worker_keep_result_seconds, queue.keep_result, DEFAULT_KEEP_RESULT),
        backoff=settings.worker_retry_backoff_seconds,
        backoff_max=settings.worker_retry_backoff_max_seconds,
        longest_timeout=_longest_timeout(queue, timeout),
        max_concurrency=limit,
        group=_first(group, settings.worker_group or None, "") or "",
        routed=queue.routed or limit > 0,
    )
