"""Every schedule the scheduler runs: from queues' ``WorkerSettings.schedules`` and from the
operators' YAML file (``WORKER_SCHEDULES_FILE`` or ``--file``), each bound to its task.

The YAML file::

    schedules:
      - name: nightly-cleanup          # optional: default the task's name
        task: cleanup_temp_files
        queue: system                  # optional when the task name is unique
        cron: "0 3 * * *"              # or: every: 30s
        tz: Europe/Berlin
        kwargs: {days_old: 3}
        catchup_window: 6h             # seconds, or 90s / 5m / 6h / 1d / 1h30m
        misfire_grace: 60s
        overlap: skip                  # all | skip | latest
        priority: high                 # high | low (optional)

Anything wrong (YAML syntax, an unknown field, a bad cron, an unknown task, arguments the
task does not take, two schedules with one name) is one ``ScheduleError`` line naming the
file and the entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from app.components.scheduler.schedule import Schedule, ScheduleError, parse_duration
from app.components.scheduler.ticks import Ticks
from app.components.worker.registry import Registry
from app.core.errors import AppError


@dataclass(frozen=True)
class Bound:
    """A schedule bound to its task: the name, task and queue its ticks are enqueued with."""

    schedule: Schedule
    name: str
    task: str
    queue: str
    origin: str
    ticks: Ticks = field(compare=False, repr=False)


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    task: str
    name: str | None = None
    queue: str | None = None
    cron: str | None = None
    every: str | float | None = None
    tz: str = "UTC"
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    catchup_window: str | float = 0
    misfire_grace: str | float = 60
    overlap: str = "all"
    priority: str | None = None


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schedules: list[_Entry] = []


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}"


def read_file(path: str | Path) -> list[Schedule]:
    """The schedules of an operators' YAML file; one ``ScheduleError`` line for anything wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ScheduleError(f"schedules file {path} does not exist: fix WORKER_SCHEDULES_FILE or --file") from None
    except OSError as exc:
        raise ScheduleError(f"schedules file {path} cannot be read ({exc.strerror}): fix its path or permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ScheduleError(f"schedules file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ScheduleError(f"schedules file {path} must be a mapping with a 'schedules:' list")
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        raise ScheduleError(f"schedules file {path}: {_first_error(exc)}") from None
    out = []
    for index, entry in enumerate(parsed.schedules):
        label = f"schedules file {path}, schedules[{index}]" + (f" ({entry.name})" if entry.name else "")
        try:
            out.append(Schedule(
                entry.task, cron=entry.cron,
                every=parse_duration(entry.every, "every") if entry.every is not None else None,
                tz=entry.tz, args=tuple(entry.args), kwargs=entry.kwargs,
                catchup_window=parse_duration(entry.catchup_window, "catchup_window"),
                misfire_grace=parse_duration(entry.misfire_grace, "misfire_grace"),
                overlap=entry.overlap, priority=entry.priority, name=entry.name, queue=entry.queue,
            ))
        except ScheduleError as exc:
            raise ScheduleError(f"{label}: {exc}") from None
    return out


def bind(schedule: Schedule, registry: Registry, origin: str, default_queue: str | None = None) -> Bound:
    """Resolve the task (and so the queue) and check the arguments against its signature."""
    try:
        spec = registry.task(schedule.task, schedule.queue or default_queue)
    except AppError as exc:
        raise ScheduleError(f"{origin}: {exc}") from None
    name = schedule.name or spec.name
    try:
        json.dumps([list(schedule.args), dict(schedule.kwargs)])
    except (TypeError, ValueError) as exc:
        raise ScheduleError(f"{origin}: schedule {name!r}: arguments cannot travel as JSON ({exc})") from None
    if spec.signature is not None:
        params = spec.signature.parameters
        kwargs = {k: v for k, v in schedule.kwargs.items()}
        if spec.context_param:
            kwargs.setdefault(spec.context_param, None)
        try:
            spec.signature.bind(*schedule.args, **kwargs)
        except TypeError as exc:
            raise ScheduleError(f"{origin}: schedule {name!r}: task {spec.name!r} does not take these arguments "
                                f"({exc}): it takes ({', '.join(params)})") from None
    return Bound(schedule, name, spec.name, spec.queue, origin, Ticks(schedule))


def collect(registry: Registry, path: str | Path | None = None) -> list[Bound]:
    """Every schedule: the queues' (in queue order), then the file's. Names must be unique."""
    bound: list[Bound] = []
    for broken in registry.broken.values():
        if "ScheduleError" in broken.reason:
            raise ScheduleError(broken.reason)
    for queue in registry.queues.values():
        items = queue.schedules
        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise ScheduleError(f"{queue.module}.WorkerSettings.schedules must be a list of Schedule(...)")
        for index, item in enumerate(items):
            origin = f"{queue.module}.WorkerSettings.schedules[{index}]"
            if not isinstance(item, Schedule):
                raise ScheduleError(f"{origin} is {type(item).__name__}, not a Schedule: write Schedule(task, cron=...)")
            bound.append(bind(item, registry, origin, default_queue=queue.name))
    if path:
        for index, item in enumerate(read_file(path)):
            bound.append(bind(item, registry, f"schedules file {path}, schedules[{index}]"))
    seen: dict[str, Bound] = {}
    for item in bound:
        if item.name in seen:
            raise ScheduleError(f"two schedules are named {item.name!r} ({seen[item.name].origin}; {item.origin}): "
                                "give each a distinct name=")
        seen[item.name] = item
    return bound
