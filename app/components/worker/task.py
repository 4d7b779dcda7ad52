"""Per-task options, set in code. They are the most specific and win over every setting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

OPTIONS_ATTR = "__worker_task_options__"


@dataclass(frozen=True)
class TaskOptions:
    name: str | None = None
    max_tries: int | None = None
    timeout: float | None = None
    retry_backoff: float | None = None
    priority: str | None = None
    rate_limit: str | None = None
    worker_group: str | None = None
    worker_selector: dict[str, str] | None = None
    fallback: str | None = None


def task(
    func: F | None = None,
    *,
    name: str | None = None,
    max_tries: int | None = None,
    timeout: float | None = None,
    retry_backoff: float | None = None,
    priority: str | None = None,
    rate_limit: str | None = None,
    worker_group: str | None = None,
    worker_selector: dict[str, str] | None = None,
    fallback: str | None = None,
) -> Any:
    """Attach options to a plain task function; the function itself is returned unchanged.

    >>> @task(max_tries=5, timeout=30)
    ... async def send_email(to: str) -> None: ...

    Routing (see ``app.components.worker.routing``): ``priority`` ("high"/"low", the default
    for this task's enqueues), ``rate_limit`` ("100/m": starts per period across all workers),
    ``worker_group`` or ``worker_selector`` (run only on that group / on workers with every
    label pair), ``fallback`` ("wait"/"fail"/"cancel": when no healthy target worker exists).
    Invalid values raise when the queue is loaded, naming the task.
    """

    def mark(f: F) -> F:
        setattr(f, OPTIONS_ATTR, TaskOptions(name, max_tries, timeout, retry_backoff, priority, rate_limit,
                                             worker_group, worker_selector, fallback))
        return f

    return mark(func) if func is not None else mark


def options_of(func: Callable[..., Any]) -> TaskOptions:
    return getattr(func, OPTIONS_ATTR, None) or TaskOptions()


class PermanentError(Exception):
    """Raise from a task to fail the job at once, with no further attempts."""


class Retry(Exception):
    """Raise from a task to ask for another attempt (it still counts against max_tries)."""

    def __init__(self, message: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay
