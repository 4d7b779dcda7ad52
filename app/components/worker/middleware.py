"""Middleware: cross-cutting behaviour around every job, the same on every engine.

Subclass ``Middleware`` and override the hooks you need; each may be sync or async.
``before_*`` hooks run in registration order, ``after_*`` / ``on_*`` in reverse. A hook that
raises is logged with the job id and never fails the job or stops the worker, except
``SkipJob`` raised from ``before_process``, which ends the job (as cancelled, with a
``job.failed`` event carrying the reason) without running it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

from app.components.worker.runtime.context import JobContext, WorkerContext

logger = logging.getLogger(__name__)

FORWARD = ("worker_start", "before_enqueue", "before_process")
REVERSE = ("worker_stop", "after_enqueue", "after_process", "on_retry", "on_failure")


class SkipJob(Exception):
    """Raise from ``before_process`` to end a job on purpose without running it."""


class Middleware:
    def worker_start(self, worker: WorkerContext) -> Any: ...

    def worker_stop(self, worker: WorkerContext) -> Any: ...

    def before_enqueue(self, job: dict[str, Any]) -> Any: ...

    def after_enqueue(self, job: dict[str, Any]) -> Any: ...

    def before_process(self, job: JobContext) -> Any: ...

    def after_process(self, job: JobContext, result: Any) -> Any: ...

    def on_retry(self, job: JobContext, error: BaseException, delay: float) -> Any: ...

    def on_failure(self, job: JobContext, error: BaseException) -> Any: ...


def load_middleware(paths: list[str]) -> list[Middleware]:
    """Instances of ``module:Class`` paths (``WORKER_MIDDLEWARE``), each built with no arguments."""
    from app.core.errors import ConfigError

    loaded = []
    for path in paths:
        module_name, _, attr = path.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"WORKER_MIDDLEWARE entry {path!r} cannot be loaded ({exc}): write module:Class") from None
        loaded.append(obj() if isinstance(obj, type) else obj)
    return loaded


def as_instances(items: list[Any]) -> list[Middleware]:
    """A queue's ``WorkerSettings.middleware`` may list classes or instances."""
    return [item() if isinstance(item, type) else item for item in items]


class MiddlewareChain:
    """Calls only the hooks a middleware overrides, in the right order, safely."""

    def __init__(self, middleware: list[Middleware]) -> None:
        self.middleware = list(middleware)
        self._hooks: dict[str, list[tuple[Any, bool]]] = {}
        for name in FORWARD + REVERSE:
            ordered = self.middleware if name in FORWARD else list(reversed(self.middleware))
            hooks = []
            for mw in ordered:
                if getattr(type(mw), name, None) is getattr(Middleware, name):
                    continue
                hook = getattr(mw, name)
                hooks.append((hook, inspect.iscoroutinefunction(hook)))
            self._hooks[name] = hooks

    def has(self, name: str) -> bool:
        return bool(self._hooks[name])

    async def call(self, name: str, *args: Any, job_id: str = "-", allow_skip: bool = False) -> None:
        for hook, is_async in self._hooks[name]:
            try:
                result = hook(*args)
                if is_async:
                    await result
            except SkipJob:
                if allow_skip:
                    raise
                logger.error("job %s: SkipJob raised in %s, which cannot skip; ignored", job_id, name)
            except Exception:
                logger.exception("job %s: middleware hook %s.%s failed; the job goes on",
                                 job_id, type(getattr(hook, "__self__", hook)).__name__, name)
