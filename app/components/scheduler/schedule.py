"""What a schedule is: a task, when it runs (cron or interval), and its policies.

Declared in a queue's ``WorkerSettings.schedules`` or in the operators' YAML file, both
build this one class; everything that can be checked without the task registry (the cron
expression, the time zone, the durations, the policy names) is checked here, when the
schedule is built, so a typo fails at startup with one line, not at 3 a.m. on the first tick.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from app.core.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
OVERLAPS = ("all", "skip", "latest")
PRIORITIES = ("high", "low")
DEFAULT_MISFIRE_GRACE = timedelta(seconds=60)
MAX_PER_PASS = 1000  # ticks one schedule may enqueue in one pass (the rest wait for the next pass)


class ScheduleError(ConfigError):
    """A schedule that cannot run: bad cron, time zone, duration, policy, task or name."""


@dataclass(frozen=True)
class Schedule:
    """``Schedule(task, cron="*/5 * * * *", tz="Europe/Berlin", kwargs={...})`` or
    ``Schedule(task, every=timedelta(seconds=30))``.

    - ``cron``: 5 fields (minute hour day month weekday) or 6 with seconds last, read by
      croniter in the wall time of ``tz``; ``every``: a fixed interval, counted from the
      Unix epoch in UTC (so every scheduler computes the same ticks).
    - ``catchup_window``: after downtime, missed ticks younger than this are enqueued, in
      order; older ones are counted as missed. ``misfire_grace``: a tick found late by at
      most this runs even without a catchup window.
    - ``overlap``: ``all`` (every tick runs), ``skip`` (no new run while the previous one is
      queued or running), ``latest`` (of several due ticks only the newest runs).
    - ``priority``: passed to enqueue as ``_priority`` when set.
    - ``name``: unique among all schedules (default: the task's name); it is part of each
      tick's job id ``sched:<name>:<tick>``.
    """

    task: str | Callable[..., Any]
    cron: str | None = None
    every: timedelta | None = None
    tz: str = "UTC"
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    catchup_window: timedelta = timedelta(0)
    misfire_grace: timedelta = DEFAULT_MISFIRE_GRACE
    overlap: str = "all"
    priority: str | None = None
    name: str | None = None
    queue: str | None = None

    def __post_init__(self) -> None:
        who = f"schedule {self.name!r}" if self.name else f"schedule of {_task_label(self.task)!r}"
        if (self.cron is None) == (self.every is None):
            raise ScheduleError(f"{who}: set exactly one of cron=\"*/5 * * * *\" or every=timedelta(...)")
        if self.cron is not None:
            if not isinstance(self.cron, str) or not croniter.is_valid(self.cron) or len(self.cron.split()) not in (5, 6):
                raise ScheduleError(f"{who}: cron {self.cron!r} is invalid: use 5 fields (minute hour day month "
                                    "weekday) like \"*/5 * * * *\", or 6 with seconds last")
        if self.every is not None:
            if not isinstance(self.every, timedelta) or self.every < timedelta(milliseconds=100):
                raise ScheduleError(f"{who}: every={self.every!r} is invalid: use a timedelta of at least 0.1 s")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ScheduleError(f"{who}: time zone {self.tz!r} is unknown: use an IANA name like "
                                "\"Europe/Berlin\" or \"UTC\"") from None
        for attr in ("catchup_window", "misfire_grace"):
            value = getattr(self, attr)
            if not isinstance(value, timedelta) or value < timedelta(0):
                raise ScheduleError(f"{who}: {attr}={value!r} is invalid: use a timedelta of 0 or more")
        if self.overlap not in OVERLAPS:
            raise ScheduleError(f"{who}: overlap={self.overlap!r} is invalid: use one of {', '.join(OVERLAPS)}")
        if self.priority is not None and self.priority not in PRIORITIES:
            raise ScheduleError(f"{who}: priority={self.priority!r} is invalid: use one of {', '.join(PRIORITIES)}")
        if self.name is not None and (not isinstance(self.name, str) or not NAME_RE.match(self.name)):
            raise ScheduleError(f"{who}: the name is invalid: use up to 100 letters, digits, _ . - (no ':')")
        if isinstance(self.args, (str, bytes)) or not isinstance(self.args, Sequence):
            raise ScheduleError(f"{who}: args must be a list")
        if not isinstance(self.kwargs, Mapping):
            raise ScheduleError(f"{who}: kwargs must be a mapping of argument names to values")

    @property
    def when(self) -> str:
        """The timing, as an operator reads it."""
        if self.cron is not None:
            return f"cron {self.cron} ({self.tz})"
        assert self.every is not None
        return f"every {format_duration(self.every)}"


def _task_label(task: Any) -> str:
    return task if isinstance(task, str) else getattr(task, "__name__", repr(task))


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)d)?\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*"
                          r"(?:(\d+(?:\.\d+)?)s)?\s*$")


def parse_duration(value: Any, what: str) -> timedelta:
    """A duration as operators write it: seconds (``90``), or ``90s``, ``5m``, ``6h``, ``1d``, ``1h30m``."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match and any(match.groups()):
            d, h, m, s = (float(g) if g else 0.0 for g in match.groups())
            return timedelta(days=d, hours=h, minutes=m, seconds=s)
    raise ScheduleError(f"{what}={value!r} is not a duration: write seconds (90) or 90s, 5m, 6h, 1d, 1h30m")
