"""What one pass does for one schedule: which ticks fire, which are missed or skipped.

Pure: given the schedule's cursor (every tick at or before it is handled), the scheduler's
now (Redis time) and the policies, it returns a plan, or None when nothing is due. The
scheduler then applies the plan atomically (claim.lua), so exactly one scheduler applies it.

The rules, in order:
1. First sight of a schedule (no cursor): start from now; nothing from the past fires.
2. Paused: due ticks are skipped (reason ``paused``); resuming does not replay them.
3. A due tick younger than ``max(misfire_grace, catchup_window)`` may run; older ones are
   *missed* (the scheduler was down), counted, one ``schedule.missed`` event per pass.
4. Of the ticks that may run, ``overlap`` decides: ``all`` runs them in order, at most
   ``MAX_PER_PASS`` per pass (the rest on the next pass); ``latest`` runs the newest;
   ``skip`` runs the newest unless the previous run is still queued or running. The others
   are *skipped*, counted, one ``schedule.skipped`` event per pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.components.scheduler.schedule import MAX_PER_PASS, Schedule
from app.components.scheduler.ticks import Ticks


@dataclass(frozen=True)
class Span:
    """Ticks not run in a pass: how many, the first and last, and why."""

    count: int
    first: int
    last: int
    reason: str


@dataclass
class Plan:
    cursor: int
    fire: list[tuple[int, str]] = field(default_factory=list)  # (tick ms, "on-time" | "catchup")
    missed: Span | None = None
    skipped: Span | None = None


def _span(ticks: Ticks, lo: int, hi: int, reason: str) -> Span | None:
    count = ticks.count(lo, hi)
    if not count:
        return None
    first, last = ticks.first(lo, hi), ticks.newest(lo, hi)
    assert first is not None and last is not None
    return Span(count, first, last, reason)


def plan(schedule: Schedule, ticks: Ticks, cursor: int | None, now: int, *, paused: bool = False,
         previous_active: bool = False, cap: int = MAX_PER_PASS) -> Plan | None:
    if cursor is None:
        return Plan(cursor=now)
    if now <= cursor or ticks.first(cursor, now) is None:
        return None
    if paused:
        return Plan(cursor=now, skipped=_span(ticks, cursor, now, "paused"))
    grace = int(schedule.misfire_grace.total_seconds() * 1000)
    window = max(grace, int(schedule.catchup_window.total_seconds() * 1000))
    oldest = now - window  # a tick at or after this may still run
    result = Plan(cursor=now, missed=_span(ticks, cursor, oldest - 1, "outside catchup window"))
    lo = max(cursor, oldest - 1)

    def reason(tick: int) -> str:
        return "on-time" if now - tick <= grace else "catchup"

    if schedule.overlap == "all":
        due = ticks.between(lo, now, cap + 1)
        if len(due) > cap:
            due = due[:cap]
            result.cursor = due[-1]
        result.fire = [(tick, reason(tick)) for tick in due]
        return result
    newest = ticks.newest(lo, now)
    if newest is None:
        return result
    if schedule.overlap == "skip" and previous_active:
        result.skipped = _span(ticks, lo, now, "overlap")
        return result
    result.fire = [(newest, reason(newest))]
    result.skipped = _span(ticks, lo, newest - 1, "overlap" if schedule.overlap == "skip" else "latest")
    return result
