"""Discovers queues (modules holding a ``WorkerSettings``) and their tasks; validates names.

A queue is a module in one of the queue packages (``WORKER_QUEUE_PACKAGES``, default
``app.components.worker.queues``). Its name is ``WorkerSettings.queue_name`` or the module name.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.components.worker.middleware import as_instances
from app.components.worker.task import options_of
from app.core.errors import ConfigError, UnknownQueue, UnknownTask
from app.core.settings import ENGINES

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    queue: str
    func: Callable[..., Any]
    is_async: bool
    max_tries: int | None
    timeout: float | None
    retry_backoff: float | None
    context_param: str | None = None
    signature: inspect.Signature | None = None


@dataclass
class QueueSpec:
    name: str
    module: str
    tasks: dict[str, TaskSpec]
    max_jobs: int | None = None
    job_timeout: float | None = None
    max_tries: int | None = None
    keep_result: int | None = None
    backend: str | None = None
    on_startup: Callable[..., Any] | None = None
    on_shutdown: Callable[..., Any] | None = None
    middleware: list[Any] = field(default_factory=list)


def _context_param(func: Callable[..., Any]) -> str | None:
    """The parameter annotated ``JobContext``, if the task asks for its context that way."""
    from app.components.worker.runtime.context import JobContext

    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no injection
        return None
    for name, hint in hints.items():
        if hint is JobContext and name != "return":
            return name
    return None


def _queue_from_module(module: Any) -> QueueSpec | None:
    ws = getattr(module, "WorkerSettings", None)
    if ws is None:
        return None
    short = module.__name__.rsplit(".", 1)[-1]
    name = getattr(ws, "queue_name", None) or short
    if not NAME_RE.match(name):
        raise ConfigError(f"queue name {name!r} in {module.__name__} is invalid: use letters, digits, _ . -")
    backend = getattr(ws, "backend", None)
    if backend is not None and backend not in ENGINES:
        raise ConfigError(
            f"{module.__name__}.WorkerSettings.backend={backend!r} is invalid: use one of {', '.join(ENGINES)}"
        )
    tasks: dict[str, TaskSpec] = {}
    for func in getattr(ws, "functions", []):
        opts = options_of(func)
        task_name = opts.name or func.__name__
        if task_name in tasks:
            raise ConfigError(f"task {task_name!r} is listed twice in queue {name!r}")
        tasks[task_name] = TaskSpec(
            name=task_name,
            queue=name,
            func=func,
            is_async=inspect.iscoroutinefunction(func),
            max_tries=opts.max_tries,
            timeout=opts.timeout,
            retry_backoff=opts.retry_backoff,
            context_param=_context_param(func),
            signature=inspect.signature(func),
        )
    if not tasks:
        raise ConfigError(f"queue {name!r} ({module.__name__}) lists no functions in WorkerSettings.functions")
    return QueueSpec(
        name=name,
        module=module.__name__,
        tasks=tasks,
        max_jobs=getattr(ws, "max_jobs", None),
        job_timeout=getattr(ws, "job_timeout", None),
        max_tries=getattr(ws, "max_tries", None),
        keep_result=getattr(ws, "keep_result", None),
        backend=backend,
        on_startup=getattr(ws, "on_startup", None),
        on_shutdown=getattr(ws, "on_shutdown", None),
        middleware=as_instances(list(getattr(ws, "middleware", []) or [])),
    )


class Registry:
    """Queues by name, and tasks by name across queues."""

    def __init__(self, queues: dict[str, QueueSpec]) -> None:
        self.queues = queues
        self._by_task: dict[str, list[TaskSpec]] = {}
        self._by_func: dict[Any, TaskSpec] = {}
        for queue in queues.values():
            for spec in queue.tasks.values():
                self._by_task.setdefault(spec.name, []).append(spec)
                self._by_func[spec.func] = spec

    @classmethod
    def discover(cls, packages: list[str]) -> Registry:
        queues: dict[str, QueueSpec] = {}
        for package_name in packages:
            try:
                package = importlib.import_module(package_name)
            except ImportError as exc:
                raise ConfigError(f"queue package {package_name!r} cannot be imported: {exc}") from None
            modules = [package]
            for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
                modules.append(importlib.import_module(f"{package_name}.{info.name}"))
            for module in modules:
                spec = _queue_from_module(module)
                if spec is None:
                    continue
                if spec.name in queues:
                    raise ConfigError(
                        f"queue {spec.name!r} is declared twice ({queues[spec.name].module}, {spec.module})"
                    )
                queues[spec.name] = spec
        return cls(queues)

    def queue(self, name: str) -> QueueSpec:
        try:
            return self.queues[name]
        except KeyError:
            known = ", ".join(sorted(self.queues)) or "none"
            raise UnknownQueue(f"unknown queue {name!r}: known queues are {known}") from None

    def task(self, ref: str | Callable[..., Any], queue: str | None = None) -> TaskSpec:
        """Find a task by function or name; ``queue`` narrows the search and must hold it."""
        if callable(ref) and not isinstance(ref, str):
            spec = self._by_func.get(ref)
            if spec is None:
                raise UnknownTask(
                    f"{getattr(ref, '__qualname__', ref)!r} is not listed in any queue's WorkerSettings.functions"
                )
            if queue is not None and spec.queue != queue:
                self.queue(queue)
                raise UnknownTask(f"task {spec.name!r} belongs to queue {spec.queue!r}, not {queue!r}")
            return spec
        if queue is not None:
            qspec = self.queue(queue)
            if ref not in qspec.tasks:
                known = ", ".join(sorted(qspec.tasks))
                raise UnknownTask(f"unknown task {ref!r} in queue {queue!r}: known tasks are {known}")
            return qspec.tasks[ref]
        candidates = self._by_task.get(ref, [])
        if not candidates:
            known = ", ".join(sorted(self._by_task)) or "none"
            raise UnknownTask(f"unknown task {ref!r}: known tasks are {known}")
        if len(candidates) > 1:
            names = ", ".join(c.queue for c in candidates)
            raise UnknownTask(f"task {ref!r} exists in several queues ({names}): name the queue (--queue Q, or _queue=\"Q\")")
        return candidates[0]
