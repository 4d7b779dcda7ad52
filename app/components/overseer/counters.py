"""Job counts and run-time histograms, folded from the event stream into Redis.

The stream is trimmed (``WORKER_EVENTS_MAXLEN``), so counting it on every request would give
numbers that fall as old entries go. Instead ``fold.lua`` adds the entries written since the
last fold to counters in a hash and moves a cursor, in one atomic step: any number of
dashboard processes (or one restarted) count each event exactly once, and the counts survive
a restart because they live in Redis, not in the dashboard's memory. Folding happens on
demand (before /metrics and the overview answer) and in the background while a dashboard
runs, a batch at a time, so a request folds only what came since the last one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.components.worker.keys import Keys

LUA = (Path(__file__).resolve().parent / "lua" / "fold.lua").read_text()
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH = 5000
MAX_BATCHES = 40  # one request folds at most this many batches; the background goes on
MINUTES_KEPT = 60


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Counters:
    """What the counters hash holds, parsed."""

    jobs: dict[tuple[str, str, str, str], int] = field(default_factory=dict)  # (queue, task, engine, outcome)
    buckets: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)  # per bucket, not cumulative
    sums_ms: dict[tuple[str, str, str], float] = field(default_factory=dict)
    timed: dict[tuple[str, str, str], int] = field(default_factory=dict)
    folded: int = 0
    dropped: int | None = None  # None: not known (Redis before 7 has no XINFO entries-added)
    cursor: str = "0-0"


class Folder:
    """Folds the stream into the counters; one per process, folds never overlap within it."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._script = redis.register_script(LUA)
        self._lock = asyncio.Lock()

    async def fold(self, max_batches: int = MAX_BATCHES) -> int:
        """Fold what was written since the last fold (up to ``max_batches`` batches)."""
        total = 0
        async with self._lock:
            for _ in range(max_batches):
                count, done = await self._script(
                    keys=[self.keys.events, self.keys.overseer("counters"), self.keys.overseer("minutes")],
                    args=[BATCH, *(int(b * 1000) for b in BUCKETS_S)],
                )
                total += int(count)
                if int(done):
                    break
        return total


async def read_counters(redis: Any, keys: Keys) -> Counters:
    raw = await redis.hgetall(keys.overseer("counters"))
    out = Counters()
    for k, v in raw.items():
        name, value = _text(k), _text(v)
        kind, _, rest = name.partition("|")
        parts = rest.split("|")
        if name == "~folded":
            out.folded = int(value)
        elif name == "~dropped":
            out.dropped = int(value)
        elif name == "~cursor":
            out.cursor = value
        elif kind == "j" and len(parts) == 4:
            out.jobs[(parts[0], parts[1], parts[2], parts[3])] = int(value)
        elif kind == "h" and len(parts) == 4:
            row = out.buckets.setdefault((parts[0], parts[1], parts[2]), [0] * (len(BUCKETS_S) + 1))
            index = int(parts[3]) - 1
            if 0 <= index < len(row):
                row[index] = int(value)
        elif kind == "hs" and len(parts) == 3:
            out.sums_ms[(parts[0], parts[1], parts[2])] = float(value)
        elif kind == "hc" and len(parts) == 3:
            out.timed[(parts[0], parts[1], parts[2])] = int(value)
    return out


async def per_minute(redis: Any, keys: Keys, now_ms: int, minutes: int = 15) -> dict[str, list[dict[str, int]]]:
    """Completed and failed per queue for each of the last ``minutes`` minutes (oldest first),
    pruning what is older than ``MINUTES_KEPT``."""
    key = keys.overseer("minutes")
    raw = await redis.hgetall(key)
    current = now_ms // 60_000
    first = current - minutes + 1
    series: dict[str, list[dict[str, int]]] = {}
    stale = []
    for k, v in raw.items():
        name = _text(k)
        minute_text, _, rest = name.partition("|")
        queue, _, outcome = rest.rpartition("|")
        try:
            minute = int(minute_text)
        except ValueError:
            continue
        if minute < current - MINUTES_KEPT:
            stale.append(name)
            continue
        if minute < first or minute > current:
            continue
        rows = series.setdefault(queue, [{"minute": m, "completed": 0, "failed": 0} for m in range(first, current + 1)])
        rows[minute - first][outcome] = int(_text(v))
    if stale:
        await redis.hdel(key, *stale)
    return series


def empty_minutes(now_ms: int, minutes: int = 15) -> list[dict[str, int]]:
    current = now_ms // 60_000
    return [{"minute": m, "completed": 0, "failed": 0} for m in range(current - minutes + 1, current + 1)]
