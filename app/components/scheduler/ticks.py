"""The instants at which a schedule is due, as Unix milliseconds.

``every`` schedules tick at whole multiples of the interval since the Unix epoch (UTC):
every scheduler, on any host, computes the same instants, so the same job ids.

Cron schedules are read by croniter in the *wall time* of the schedule's zone (naive
datetimes, so croniter never guesses about daylight saving), and each wall time becomes an
instant by one rule, the DST policy:

- a wall time that does not exist (the hour skipped when clocks spring forward) becomes the
  first valid time after the gap (02:30 on a Berlin spring-forward day runs at 03:00 CEST);
  several skipped wall times that land on the same instant run once;
- a wall time that exists twice (the hour repeated when clocks fall back) is its first
  occurrence (fold=0): the repeated hour fires once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from app.components.scheduler.schedule import Schedule

COUNT_LIMIT = 100_000  # ticks counted one by one at most (a long outage of a per-second cron)
RECENT_MS = 3 * 3600 * 1000  # the newest tick is looked for forwards in this span (DST-safe)


def iso(ms: int) -> str:
    """A tick as it appears in job ids and events: UTC, ISO 8601, ``Z``; milliseconds only when set."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    spec = "milliseconds" if ms % 1000 else "seconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


class Ticks:
    """The ticks of one schedule; all bounds are Unix ms and intervals are ``(lo, hi]``."""

    def __init__(self, schedule: Schedule) -> None:
        self.cron = schedule.cron
        self.period = int(schedule.every.total_seconds() * 1000) if schedule.every is not None else 0
        self.zone = ZoneInfo(schedule.tz)

    # -- the two kinds --------------------------------------------------------------------

    def _iter(self, lo: int, hi: int | None) -> Iterator[int]:
        """Ticks in (lo, hi] ascending, without repeats (hi None: unbounded)."""
        if self.period:
            k = lo // self.period + 1
            while hi is None or k * self.period <= hi:
                yield k * self.period
                k += 1
            return
        assert self.cron is not None
        it = croniter(self.cron, self._wall(lo))
        last = lo
        while True:
            moment = self._instant(it.get_next(datetime))
            if moment <= last:  # at or before lo (a repeated hour), or a gap's repeat
                continue
            if hi is not None and moment > hi:
                return
            last = moment
            yield moment

    def _wall(self, ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, self.zone).replace(tzinfo=None)

    def _instant(self, wall: datetime) -> int:
        """Wall time in the zone -> Unix ms, by the DST policy in the module docstring."""
        aware = wall.replace(tzinfo=self.zone, fold=0)
        if aware.astimezone(UTC).astimezone(self.zone).replace(tzinfo=None) != wall:  # in a gap
            probe = wall.replace(second=0, microsecond=0)
            for _ in range(48 * 60):
                probe += timedelta(minutes=1)
                aware = probe.replace(tzinfo=self.zone, fold=0)
                if aware.astimezone(UTC).astimezone(self.zone).replace(tzinfo=None) == probe:
                    break
        return round(aware.timestamp() * 1000)

    # -- what the planner asks --------------------------------------------------------------

    def between(self, lo: int, hi: int, limit: int) -> list[int]:
        """The first ``limit`` ticks in (lo, hi]."""
        return list(itertools.islice(self._iter(lo, hi), limit)) if hi > lo else []

    def count(self, lo: int, hi: int) -> int:
        """How many ticks in (lo, hi]; a cron counts one by one, at most ``COUNT_LIMIT``."""
        if hi <= lo:
            return 0
        if self.period:
            return hi // self.period - lo // self.period
        return sum(1 for _ in itertools.islice(self._iter(lo, hi), COUNT_LIMIT))

    def first(self, lo: int, hi: int) -> int | None:
        return next(self._iter(lo, hi), None) if hi > lo else None

    def newest(self, lo: int, hi: int) -> int | None:
        """The newest tick in (lo, hi], or None."""
        if hi <= lo:
            return None
        if self.period:
            tick = hi // self.period * self.period
            return tick if tick > lo else None
        recent = None
        for recent in self._iter(max(lo, hi - RECENT_MS), hi):  # noqa: B007 - the last one is wanted
            pass
        if recent is not None:
            return recent
        assert self.cron is not None
        tick = self._instant(croniter(self.cron, self._wall(hi) + timedelta(seconds=1)).get_prev(datetime))
        return tick if lo < tick <= hi else None

    def next_after(self, ms: int) -> int:
        return next(self._iter(ms, None))
