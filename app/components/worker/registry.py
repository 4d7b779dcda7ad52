"""Discovers queues (modules holding a ``WorkerSettings``) and their tasks; validates names.

A queue is a module in one of the queue packages (``WORKER_QUEUE_PACKAGES``, default
``app.components.worker.queues``). Its name is ``WorkerSettings.queue_name`` or the module name.

A queue module that cannot be used (it fails to import, lists something that is not a
function, misspells a setting) does not break the others: it is recorded as broken with a
one-line reason, and only what is about that queue fails with that line (``app queues``
lists it with its error). Unknown ``WorkerSettings`` attributes are refused, with the
closest known name, because a misspelt ``max_job = 20`` silently ignored is a bug to find
in production.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.components.worker.middleware import as_instances
from app.components.worker.routing.options import (
    RateLimit,
    canonical_selector,
    check_fallback,
    check_group,
    check_priority,
    check_selector,
)
from app.components.worker.task import options_of
from app.core.errors import ConfigError, InvalidOption, UnknownQueue, UnknownTask
from app.core.settings import ENGINES

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# Every attribute a WorkerSettings may set; anything else is refused as a likely typo.
SETTINGS_ATTRIBUTES = (
    "functions", "queue_name", "max_jobs", "job_timeout", "max_tries", "keep_result", "backend",
    "on_startup", "on_shutdown", "middleware",
    "max_concurrency", "worker_group", "worker_selector", "fallback", "schedules",
)
_NUMBERS = {"max_jobs": (int, 1), "job_timeout": ((int, float), 0), "max_tries": (int, 1), "keep_result": (int, 1)}


@dataclass(frozen=True)
class BrokenQueue:
    """A queue module that cannot be used, with the one line that says why."""

    name: str
    module: str
    reason: str


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
    priority: str | None = None
    rate_limit: RateLimit | None = None
    worker_group: str | None = None
    worker_selector: str | None = None  # canonical k=v,k=v
    fallback: str | None = None

    @property
    def routed(self) -> bool:
        """Jobs of this task always go through admission (a priority or a rate limit: both
        are strict only when every job of the queue waits in the layer's ordered sets)."""
        return self.priority is not None or self.rate_limit is not None


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
    max_concurrency: int | None = None
    worker_group: str | None = None
    worker_selector: str | None = None  # canonical k=v,k=v
    fallback: str | None = None

    @property
    def routed(self) -> bool:
        """Every job of this queue goes through admission, from its settings in code alone
        (``WORKER_MAX_CONCURRENCY_<QUEUE>`` can make it routed from the environment too)."""
        return (self.max_concurrency is not None or self.worker_group is not None
                or self.worker_selector is not None or any(t.routed for t in self.tasks.values()))
    schedules: list[Any] = field(default_factory=list)  # Schedule(...) items, read by app.components.scheduler


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
    _check_attributes(module.__name__, ws)
    if not NAME_RE.match(name):
        raise ConfigError(f"queue name {name!r} in {module.__name__} is invalid: use letters, digits, _ . -")
    backend = getattr(ws, "backend", None)
    if backend is not None and backend not in ENGINES:
        raise ConfigError(
            f"{module.__name__}.WorkerSettings.backend={backend!r} is invalid: use one of {', '.join(ENGINES)}"
        )
    tasks: dict[str, TaskSpec] = {}
    functions = getattr(ws, "functions", [])
    if isinstance(functions, (str, bytes)) or not hasattr(functions, "__iter__"):
        raise ConfigError(f"{module.__name__}.WorkerSettings.functions must be a list of functions, "
                          f"not {type(functions).__name__}")
    for index, func in enumerate(functions):
        if not callable(func):
            raise ConfigError(f"{module.__name__}.WorkerSettings.functions[{index}] is {func!r} "
                              f"({type(func).__name__}), not a function: list the function itself")
        opts = options_of(func)
        task_name = opts.name or func.__name__
        if task_name in tasks:
            raise ConfigError(f"task {task_name!r} is listed twice in queue {name!r}")
        routing = _task_routing(module.__name__, task_name, opts)
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
            **routing,
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
        **_queue_routing(module.__name__, ws),
        schedules=getattr(ws, "schedules", None) or [],
    )


def _checked(where: str, check: Callable[..., Any], value: Any) -> Any:
    try:
        return check(value, where)
    except InvalidOption as exc:
        raise ConfigError(str(exc)) from None


def _target(where: str, group: Any, selector: Any) -> dict[str, Any]:
    if group is not None and selector is not None:
        raise ConfigError(f"{where}: set worker_group or worker_selector, not both")
    return {
        "worker_group": _checked(f"{where}.worker_group", check_group, group) if group is not None else None,
        "worker_selector": canonical_selector(_checked(f"{where}.worker_selector", check_selector, selector))
        if selector is not None else None,
    }


def _task_routing(module: str, task: str, opts: Any) -> dict[str, Any]:
    where = f"task {task!r} ({module})"
    return {
        "priority": _checked(f"{where} priority", check_priority, opts.priority) if opts.priority else None,
        "rate_limit": _checked(f"{where} rate_limit", RateLimit.parse, opts.rate_limit) if opts.rate_limit else None,
        "fallback": _checked(f"{where} fallback", check_fallback, opts.fallback) if opts.fallback else None,
        **_target(where, opts.worker_group, opts.worker_selector),
    }


def _queue_routing(module: str, ws: Any) -> dict[str, Any]:
    where = f"{module}.WorkerSettings"
    fallback = getattr(ws, "fallback", None)
    limit = getattr(ws, "max_concurrency", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{where}.max_concurrency={limit!r} is invalid: use an integer >= 1")
    return {
        "max_concurrency": limit,
        "fallback": _checked(f"{where}.fallback", check_fallback, fallback) if fallback is not None else None,
        **_target(where, getattr(ws, "worker_group", None), getattr(ws, "worker_selector", None)),
    }


def _check_attributes(module: str, ws: Any) -> None:
    """Refuse unknown (misspelt) settings and numbers that make no sense, naming them."""
    klasses = inspect.getmro(ws)[:-1] if inspect.isclass(ws) else [type(ws), ws]
    names = {n for klass in klasses for n in getattr(klass, "__dict__", {}) if not n.startswith("_")}
    for attr in sorted(names - set(SETTINGS_ATTRIBUTES)):
        close = difflib.get_close_matches(attr, SETTINGS_ATTRIBUTES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known settings: {', '.join(SETTINGS_ATTRIBUTES)}"
        raise ConfigError(f"{module}.WorkerSettings.{attr} is not a setting: {hint}")
    for attr, (kind, low) in _NUMBERS.items():
        value = getattr(ws, attr, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind) or value < low or value != value:
            what = "an integer" if kind is int else "a number of seconds"
            raise ConfigError(f"{module}.WorkerSettings.{attr}={value!r} is invalid: use {what} "
                              f"{'>= ' + str(low) if kind is int else '> 0'}")
        if kind is not int and value <= 0:
            raise ConfigError(f"{module}.WorkerSettings.{attr}={value!r} is invalid: use a number of seconds > 0")


def _import_error(module: str, exc: BaseException) -> str:
    """One line for a module that failed to import: where, and what."""
    if isinstance(exc, SyntaxError):
        where = f" ({exc.filename}:{exc.lineno})" if exc.filename else ""
        return f"queue module {module} cannot be imported: SyntaxError: {exc.msg}{where}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"queue module {module} cannot be imported: {type(exc).__name__}: {text}"


class Registry:
    """Queues by name, and tasks by name across queues; broken queue modules by name."""

    def __init__(self, queues: dict[str, QueueSpec], broken: dict[str, BrokenQueue] | None = None) -> None:
        self.queues = queues
        self.broken = broken or {}
        self._by_task: dict[str, list[TaskSpec]] = {}
        self._by_func: dict[Any, TaskSpec] = {}
        for queue in queues.values():
            for spec in queue.tasks.values():
                self._by_task.setdefault(spec.name, []).append(spec)
                self._by_func[spec.func] = spec

    @classmethod
    def discover(cls, packages: list[str]) -> Registry:
        queues: dict[str, QueueSpec] = {}
        broken: dict[str, BrokenQueue] = {}

        def mark(name: str, module: str, reason: str) -> None:
            broken.setdefault(name, BrokenQueue(name, module, reason))

        for package_name in packages:
            try:
                package = importlib.import_module(package_name)
            except ImportError as exc:
                if getattr(exc, "name", None) and package_name.startswith(str(exc.name)):
                    raise ConfigError(f"queue package {package_name!r} in WORKER_QUEUE_PACKAGES cannot be "
                                      f"imported: {exc}") from None
                raise ConfigError(_import_error(package_name, exc)) from None
            except Exception as exc:  # noqa: BLE001 - any failure of user code is one line
                raise ConfigError(_import_error(package_name, exc)) from None
            modules = [package]
            for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
                path = f"{package_name}.{info.name}"
                try:
                    modules.append(importlib.import_module(path))
                except Exception as exc:  # noqa: BLE001 - one broken module must not hide the others
                    mark(info.name, path, _import_error(path, exc))
            for module in modules:
                try:
                    spec = _queue_from_module(module)
                except ConfigError as exc:
                    ws = getattr(module, "WorkerSettings", None)
                    name = getattr(ws, "queue_name", None)
                    name = name if isinstance(name, str) and name else module.__name__.rsplit(".", 1)[-1]
                    mark(name, module.__name__, str(exc))
                    continue
                if spec is None:
                    continue
                if spec.name in queues:
                    mark(spec.name, spec.module,
                         f"queue {spec.name!r} is declared twice ({queues[spec.name].module}, {spec.module})")
                    continue
                queues[spec.name] = spec
        for name in broken:
            queues.pop(name, None)  # a queue declared twice is broken as a whole
        return cls(queues, broken)

    def queue(self, name: str) -> QueueSpec:
        try:
            return self.queues[name]
        except KeyError:
            if name in self.broken:
                raise ConfigError(self.broken[name].reason) from None
            known = ", ".join(sorted(self.queues)) or "none"
            raise UnknownQueue(f"unknown queue {name!r}: known queues are {known}{self._broken_note()}") from None

    def _broken_note(self) -> str:
        if not self.broken:
            return ""
        names = ", ".join(sorted(self.broken))
        return f" (queues not loaded because their module is broken: {names}; `app queues` says why)"

    def task(self, ref: str | Callable[..., Any], queue: str | None = None) -> TaskSpec:
        """Find a task by function or name; ``queue`` narrows the search and must hold it."""
        if callable(ref) and not isinstance(ref, str):
            spec = self._by_func.get(ref)
            if spec is None:
                raise UnknownTask(
                    f"{getattr(ref, '__qualname__', ref)!r} is not listed in any queue's WorkerSettings.functions"
                    f"{self._broken_note()}"
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
            raise UnknownTask(f"unknown task {ref!r}: known tasks are {known}{self._broken_note()}")
        if len(candidates) > 1:
            names = ", ".join(c.queue for c in candidates)
            raise UnknownTask(f"task {ref!r} exists in several queues ({names}): name the queue (--queue Q, or _queue=\"Q\")")
        return candidates[0]
