"""The effective tuning of one queue: CLI flag > environment > WorkerSettings > default.

An option set in code on one task (``@task(max_tries=..., timeout=...)``) is more specific
and wins over all of these; that choice is made per job in the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def engine_for(queue: QueueSpec, settings: Settings, cli_backend: str | None = None) -> str:
    """CLI > WORKER_BACKEND_<QUEUE> > WORKER_BACKEND (when set) > WorkerSettings.backend > arq."""
    explicit_default = "worker_backend" in settings.model_fields_set
    return _first(
        cli_backend,
        settings.backend_for(queue.name),
        settings.worker_backend if explicit_default else None,
        queue.backend,
        settings.worker_backend,
    )


def _longest_timeout(queue: QueueSpec, timeout: float) -> float:
    return max([timeout, *(t.timeout for t in queue.tasks.values() if t.timeout)])


def resolve(
    queue: QueueSpec,
    settings: Settings,
    *,
    backend: str | None = None,
    processes: int | None = None,
    threads: int | None = None,
) -> QueueConfig:
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
    )
