"""The message the layer hands to every engine: one JSON string, the same on all three.

Engines carry it opaquely as the single argument of one dispatcher function, so unknown
tasks, bad arguments and attempt counting are decided by the layer, not by an engine.
``try`` is the attempt this delivery is for; the runtime refuses stale deliveries with it.
``run`` is a random token drawn once per accepted enqueue and stored in the job record: a
delivery runs only when it belongs to the current run of its id, so a stale message of an
earlier job under a reused id never runs with the old arguments.

Routing fields are present only when set, so a plain job's message stays as small as before:
``priority`` ("high"; absent = low), ``group``, ``selector`` (canonical ``k=v,k=v``),
``routed`` (true: the job goes through admission, see routing/), ``tags`` (str -> str),
``limited`` (true: its task has a rate limit).
They sit before the arguments, so ``recover_id``'s first/last-match rule still holds.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from app.components.worker.clock import now_ms
from app.core.errors import PayloadError

__all__ = ["DISPATCH_NAME", "Envelope", "Recovered", "new_job_id", "new_run", "now_ms", "recover_id", "send_id"]

DISPATCH_NAME = "app.run"

# Message ids: a per-process random prefix and a counter, so two sends never share an id,
# across processes too, at the cost of a counter step per send.
_SEND_PREFIX = os.urandom(3).hex()
_sends = itertools.count(1)
_ID_PATTERN = re.compile(r'"id"\s*:\s*"([^"\\\x00-\x1f]{1,256})"')
_RUN_PATTERN = re.compile(r'"run"\s*:\s*"([0-9a-f]{1,64})"')
_TRY_PATTERN = re.compile(r'"try"\s*:\s*([0-9]{1,9})\b')
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # json.dumps builds one per call
_STR = json.encoder.encode_basestring_ascii  # json.dumps of one str, in C (TypeError for anything else)
_TASK_PATTERN = re.compile(r'"task"\s*:\s*"([^"\\\x00-\x1f]{1,256})"')


_UUID4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def new_job_id() -> str:
    """A random UUID4 as 32 hex digits (``uuid.uuid4().hex``, without the UUID object: a bulk
    enqueue draws one per job)."""
    return "%032x" % ((int.from_bytes(os.urandom(16)) & _UUID4_CLEAR) | _UUID4_SET)


def send_id(job_id: str, try_: int = 1) -> str:
    """A fresh engine-level id for one send of a delivery (``Envelope.message_id``)."""
    return f"{job_id}.{try_}.{_SEND_PREFIX}{next(_sends):x}"


def new_run() -> str:
    """A fresh run token: 64 random bits, hex."""
    return os.urandom(8).hex()


class Recovered(NamedTuple):
    job_id: str
    run: str  # "" when not found
    try_: int  # 0 when not found
    task: str  # "" when not found


def recover_id(raw: str) -> Recovered | None:
    """What a regex can still read from a message that cannot be decoded (too deep, bad UTF-8,
    a broken field), so its job can be ended; None when no job id is found."""
    found = _ID_PATTERN.search(raw)
    if not found:
        return None
    # The layer writes id and task before the arguments, try and run after them: the first
    # and the last match are the envelope's own, whatever keys the arguments hold.
    runs = _RUN_PATTERN.findall(raw)
    tries = _TRY_PATTERN.findall(raw)
    task = _TASK_PATTERN.search(raw)
    return Recovered(found.group(1), runs[-1] if runs else "", int(tries[-1]) if tries else 0,
                     task.group(1) if task else "")


@dataclass
class Envelope:
    id: str
    task: str
    queue: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    try_: int = 1
    enqueued_at: int = 0
    run: str = ""
    priority: str = "low"
    group: str = ""
    selector: str = ""
    routed: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    limited: bool = False  # its task has a rate limit: it waits in the task's own ready set
    timeout: float | None = None  # this job's own timeout per attempt (``_timeout``), over the task's
    max_tries: int | None = None  # this job's own attempts (``_max_tries``), over the task's

    def encode(self) -> str:
        try:
            return self._encode_fast()
        except (TypeError, ValueError, RecursionError):
            return self._encode_dict()  # the reference encoding: raises PayloadError if it must

    def _encode_fast(self) -> str:
        """``_encode_dict``'s text (the same, checked by a test), written directly: every enqueue
        and retry encodes one envelope. Raises on anything not of the usual types."""
        if type(self.try_) is not int or type(self.enqueued_at) is not int:
            raise TypeError("not the usual types")
        parts = ['{"id":', _STR(self.id), ',"task":', _STR(self.task), ',"queue":', _STR(self.queue)]
        if self.priority != "low":
            parts += [',"priority":', _STR(self.priority)]
        if self.group:
            parts += [',"group":', _STR(self.group)]
        if self.selector:
            parts += [',"selector":', _STR(self.selector)]
        if self.routed:
            parts.append(',"routed":true')
        if self.limited:
            parts.append(',"limited":true')
        if self.timeout is not None:
            parts += [',"timeout":', _ENCODER.encode(self.timeout)]
        if self.max_tries is not None:
            parts += [',"max_tries":', _ENCODER.encode(self.max_tries)]
        if self.tags:
            parts += [',"tags":', _ENCODER.encode(self.tags)]
        parts += [',"args":', _ENCODER.encode(self.args) if self.args or type(self.args) is not list else "[]",
                  ',"kwargs":', _ENCODER.encode(self.kwargs) if self.kwargs or type(self.kwargs) is not dict else "{}",
                  ',"try":', str(self.try_), ',"enqueued_at":', str(self.enqueued_at), ',"run":', _STR(self.run), "}"]
        return "".join(parts)

    def _encode_dict(self) -> str:
        data: dict[str, Any] = {"id": self.id, "task": self.task, "queue": self.queue}
        if self.priority != "low":
            data["priority"] = self.priority
        if self.group:
            data["group"] = self.group
        if self.selector:
            data["selector"] = self.selector
        if self.routed:
            data["routed"] = True
        if self.limited:
            data["limited"] = True
        if self.timeout is not None:
            data["timeout"] = self.timeout
        if self.max_tries is not None:
            data["max_tries"] = self.max_tries
        if self.tags:
            data["tags"] = self.tags
        data.update(args=self.args, kwargs=self.kwargs)
        data.update({"try": self.try_, "enqueued_at": self.enqueued_at, "run": self.run})
        try:
            return _ENCODER.encode(data)
        except (TypeError, ValueError) as exc:
            raise PayloadError(
                f"arguments of {self.task!r} cannot be sent as JSON ({exc}): pass str, int, float, "
                "bool, None, lists and dicts"
            ) from None
        except RecursionError:
            raise PayloadError(f"arguments of {self.task!r} are nested too deep to send as JSON") from None

    @property
    def message_id(self) -> str:
        """A fresh engine-level id for one send of this delivery: each read gives a new one
        (``<job id>.<try>.<token>``), so no two sends share an id, not even a hand-back of the
        same attempt (arq deletes by id when it ends a delivery)."""
        return send_id(self.id, self.try_)

    def next_try(self, attempt: int) -> Envelope:
        return replace(self, try_=attempt + 1)

    @property
    def tags_text(self) -> str:
        """Tags as ``k=v,k=v`` sorted by key, for events ('' when none)."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.tags.items()))

    @classmethod
    def decode(cls, raw: str | bytes) -> Envelope:
        """Parse a message; raises ValueError with a reason for anything malformed (a message
        nested too deep raises RecursionError, bad UTF-8 UnicodeDecodeError: callers catch
        every Exception)."""
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
        if not isinstance(try_, int) or isinstance(try_, bool) or try_ < 1:
            raise ValueError("message try must be a positive integer")
        enqueued_at = data.get("enqueued_at") or 0
        if not isinstance(enqueued_at, (int, float)) or isinstance(enqueued_at, bool) or not 0 <= enqueued_at < 1e15:
            raise ValueError("message enqueued_at must be a time in ms")
        run = data.get("run", "")
        if not isinstance(run, str):
            raise ValueError("message run must be a string")
        priority, group, selector = data.get("priority", "low"), data.get("group", ""), data.get("selector", "")
        if priority not in ("high", "low") or not isinstance(group, str) or not isinstance(selector, str):
            raise ValueError("message priority, group or selector is invalid")
        tags = data.get("tags") or {}
        if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise ValueError("message tags must be an object of strings")
        return cls(job_id, task, queue, args, kwargs, try_, int(enqueued_at), run, priority, group, selector,
                   data.get("routed") is True, tags, data.get("limited") is True, *_overrides(data))


def _overrides(data: dict[str, Any]) -> tuple[float | None, int | None]:
    """A job's own timeout and max_tries, checked like the rest of the message."""
    timeout, max_tries = data.get("timeout"), data.get("max_tries")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < 1e9):
        raise ValueError("message timeout must be a positive number of seconds")
    if max_tries is not None and (isinstance(max_tries, bool) or not isinstance(max_tries, int)
                                  or not 1 <= max_tries <= 1_000_000):
        raise ValueError("message max_tries must be a positive integer")
    return (float(timeout) if timeout is not None else None), max_tries
