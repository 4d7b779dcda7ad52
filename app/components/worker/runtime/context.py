"""What a running task may know about itself, without importing any engine."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

from app.components.worker.clock import now_ms


@dataclass
class WorkerContext:
    """One per worker process; ``state`` is where ``on_startup`` keeps shared resources."""

    queue: str
    engine: str
    worker_id: str
    instance: str = ""
    state: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.state[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.state[key] = value


@dataclass
class JobContext:
    job_id: str
    task: str
    queue: str
    engine: str
    attempt: int
    max_tries: int
    enqueued_at: int
    worker_id: str
    worker: WorkerContext
    started_ms: int = 0
    tags: dict[str, str] = field(default_factory=dict)

    def duration_ms(self) -> int:
        return max(0, now_ms() - self.started_ms)  # started_ms: this host's clock (or, recovered, another's)

    @property
    def state(self) -> dict[str, Any]:
        return self.worker.state


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("current_job", default=None)


def current_job() -> JobContext:
    """The context of the job running in this task (or its thread, for sync tasks)."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("current_job() is only available inside a running task")
    return ctx


def set_current(ctx: JobContext | None) -> contextvars.Token[JobContext | None]:
    return _current.set(ctx)
