"""What the overview and the workers page show: queue rows, rates, run times, workers.

Read from Redis only, a few commands per queue whatever waits: engine counts are
``ZCARD``/``XLEN``-like, the last-minute rates and the chart come from the per-minute counts
the fold keeps, p50/p95 from a bounded read of the newest events.
"""

from __future__ import annotations

from typing import Any

from app.components.overseer.counters import empty_minutes, per_minute
from app.components.overseer.history import _raw
from app.components.worker import config as queue_config
from app.components.worker.engine_switch import live_engine_beats, waiting_in
from app.components.worker.engines import engine_class
from app.components.worker.health import Thresholds, list_workers, redis_now_ms
from app.components.worker.metrics import running_jobs
from app.components.worker.routing.stats import routing_state
from app.core.settings import ENGINES

PERCENTILE_SAMPLE = 2000  # newest events read for p50/p95


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


async def run_times(client: Any) -> dict[str, dict[str, float | None]]:
    """p50/p95 run time (ms) per queue over the newest finished attempts in the stream."""
    entries = await client.redis.xrevrange(client.keys.events, count=PERCENTILE_SAMPLE)
    values: dict[str, list[float]] = {}
    for _, fields in entries:
        duration = _raw(fields, "duration_ms")
        if duration and _raw(fields, "type") in ("job.completed", "job.failed", "job.retried"):
            try:
                values.setdefault(_raw(fields, "queue"), []).append(float(duration))
            except ValueError:
                continue
    return {q: {"p50_ms": _percentile(v, 0.5), "p95_ms": _percentile(v, 0.95), "sample": len(v)}
            for q, v in values.items()}


def _last_minute(history: list[dict[str, int]], now_ms: int) -> dict[str, int]:
    """Completed/failed over the last 60 s from the per-minute counts: this minute so far plus
    the part of the previous minute still inside the window (pro rata)."""
    if not history:
        return {"completed": 0, "failed": 0}
    share = 1 - (now_ms % 60_000) / 60_000
    previous = history[-2] if len(history) > 1 else {"completed": 0, "failed": 0}
    return {k: round(history[-1][k] + previous[k] * share) for k in ("completed", "failed")}


async def queue_rows(client: Any, adapters: dict[tuple[str, str], Any], history: dict[str, list[dict[str, int]]],
                     now: int) -> list[dict[str, Any]]:
    """The rows of ``app queues`` (see ``worker.metrics.queue_metrics``), read the same way but
    with the engine adapters kept between requests (no new connection per queue and page) and
    the last-minute rates from the folded per-minute counts instead of a 10,000-event sample."""
    settings, keys = client.settings, client.keys
    live_workers = await workers(client)
    rows = []
    for name, spec in sorted(client.registry.queues.items()):
        live = await live_engine_beats(client.redis, keys, name, settings.worker_offline_after)
        explicit = queue_config.explicit_engine_for(spec, settings)
        if not explicit and not live:
            held = {engine: await waiting_in(client.redis, keys, name, engine) for engine in ENGINES}
            live = {engine: count for engine, count in held.items() if count}
        engine = queue_config.choose_engine(explicit, live, settings.worker_backend)
        adapter = adapters.get((name, engine))
        if adapter is None:
            cfg = queue_config.with_engine(queue_config.resolve(spec, settings), engine)
            adapter = adapters[(name, engine)] = engine_class(cfg.engine)(settings, keys, cfg)
        stats = await adapter.stats()
        running = running_jobs(live_workers, name)
        routing = await routing_state(client.redis, keys, name)
        dead = int(await client.redis.zcard(keys.dead(name)))  # dead letters; "failed" adds the engine's own
        routed_waiting = sum(c["high"] + c["low"] for c in routing["waiting"].values())
        rows.append({
            "queue": name, "engine": engine, "ready": stats.ready + max(0, stats.running - running) + routed_waiting,
            "delayed": int(await client.redis.zcard(keys.delayed(name))), "running": running,
            "failed": stats.dead + dead, "dead": dead,
            "per_minute": _last_minute(history.get(name, []), now),
            "workers": sum(1 for w in live_workers if w["queue"] == name and w["state"] == "healthy"),
            "paused": routing["paused"], "routed": routing["routed"], "waiting_by_group": routing["waiting"],
            "max_concurrency": adapter.config.max_concurrency or None, "leases": routing["leases"],
        })
    for name, broken in sorted(client.registry.broken.items()):
        rows.append({
            "queue": name, "engine": None, "ready": None, "delayed": None, "running": None, "failed": None, "dead": None,
            "per_minute": {"completed": 0, "failed": 0},
            "workers": sum(1 for w in live_workers if w["queue"] == name and w["state"] == "healthy"),
            "paused": False, "routed": False, "waiting_by_group": {}, "max_concurrency": None, "leases": 0,
            "error": broken.reason,
        })
    return rows


async def queues(client: Any, adapters: dict[tuple[str, str], Any] | None = None) -> list[dict[str, Any]]:
    """Every queue: engine, ready/delayed/running/failed/dead, groups, paused, rates, run times."""
    now = await redis_now_ms(client.redis)
    history = await per_minute(client.redis, client.keys, now)
    rows = await queue_rows(client, {} if adapters is None else adapters, history, now)
    times = await run_times(client)
    for row in rows:
        name = row["queue"]
        row["run_time"] = times.get(name, {"p50_ms": None, "p95_ms": None, "sample": 0})
        row["history"] = history.get(name) or empty_minutes(now)
    return rows


async def workers(client: Any, queue: str | None = None) -> list[dict[str, Any]]:
    """Workers with a heartbeat key, their health state (Dagu's thresholds, from settings)."""
    return await list_workers(client.redis, client.keys, Thresholds.from_settings(client.settings), queue)
