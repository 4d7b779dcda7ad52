"""The message the layer hands to every engine: one JSON string, the same on all three.

Engines carry it opaquely as the single argument of one dispatcher function, so unknown
tasks, bad arguments and attempt counting are decided by the layer, not by an engine.
``try`` is the attempt this delivery is for; the runtime refuses stale deliveries with it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.components.worker.clock import now_ms
from app.core.errors import PayloadError

__all__ = ["DISPATCH_NAME", "Envelope", "new_job_id", "now_ms"]

DISPATCH_NAME = "app.run"


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Envelope:
    id: str
    task: str
    queue: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    try_: int = 1
    enqueued_at: int = 0

    def encode(self) -> str:
        try:
            return json.dumps(
                {
                    "id": self.id, "task": self.task, "queue": self.queue, "args": self.args,
                    "kwargs": self.kwargs, "try": self.try_, "enqueued_at": self.enqueued_at,
                },
                separators=(",", ":"),
                allow_nan=False,
            )
        except (TypeError, ValueError) as exc:
            raise PayloadError(
                f"arguments of {self.task!r} cannot be sent as JSON ({exc}): pass str, int, float, "
                "bool, None, lists and dicts"
            ) from None

    @property
    def message_id(self) -> str:
        """The engine-level id of this delivery: unique per attempt, so engines that refuse
        a reused id (arq) accept the retry."""
        return f"{self.id}.{self.try_}"

    def next_try(self, attempt: int) -> Envelope:
        return Envelope(self.id, self.task, self.queue, self.args, self.kwargs, attempt + 1, self.enqueued_at)

    @classmethod
    def decode(cls, raw: str | bytes) -> Envelope:
        """Parse a message; raises ValueError with a reason for anything malformed."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("message is not a JSON object")
        job_id, task, queue = data.get("id"), data.get("task"), data.get("queue")
        if not all(isinstance(v, str) and v for v in (job_id, task, queue)):
            raise ValueError("message lacks id, task or queue")
        args, kwargs = data.get("args", []), data.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("message args must be a list and kwargs an object")
        try_ = data.get("try", 1)
        if not isinstance(try_, int) or try_ < 1:
            raise ValueError("message try must be a positive integer")
        return cls(job_id, task, queue, args, kwargs, try_, int(data.get("enqueued_at") or 0))
