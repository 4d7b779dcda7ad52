"""Queue metrics: what waits and runs, read from the engine's own keys and the layer's."""

from __future__ import annotations

from typing import Any

from app.components.worker import config as queue_config
from app.components.worker.engines import engine_class
from app.components.worker.envelope import now_ms
from app.components.worker.events import _decode
from app.components.worker.health import Thresholds, list_workers
from app.components.worker.keys import Keys

WINDOW_MS = 60_000


async def rates_last_minute(redis: Any, keys: Keys) -> dict[str, dict[str, int]]:
    """Completed and failed per queue over the last minute, from the event stream."""
    since = now_ms() - WINDOW_MS
    rates: dict[str, dict[str, int]] = {}
    entries = await redis.xrange(keys.events, min=f"{since}-0", max="+", count=1_000_000)
    for _, fields in entries:
        event = _decode(fields)
        kind = event.get("type")
        if kind in ("job.completed", "job.failed"):
            counts = rates.setdefault(event.get("queue", ""), {"completed": 0, "failed": 0})
            counts["completed" if kind == "job.completed" else "failed"] += 1
    return rates


async def queue_metrics(client: Any) -> list[dict[str, Any]]:
    """One row per known queue; works with no worker running (it reads what waits)."""
    settings = client.settings
    keys = client.keys
    thresholds = Thresholds.from_settings(settings)
    workers = await list_workers(client.redis, keys, thresholds)
    rates = await rates_last_minute(client.redis, keys)
    rows = []
    for name, spec in sorted(client.registry.queues.items()):
        cfg = queue_config.resolve(spec, settings)
        adapter = engine_class(cfg.engine)(settings, keys, cfg)
        try:
            stats = await adapter.stats()
        finally:
            await adapter.close()
        delayed = await client.redis.zcard(keys.delayed(name))
        rate = rates.get(name, {"completed": 0, "failed": 0})
        rows.append({
            "queue": name, "engine": cfg.engine, "ready": stats.ready, "delayed": delayed,
            "running": stats.running, "failed": stats.dead, "per_minute": rate,
            "workers": sum(1 for w in workers if w["queue"] == name and w["state"] == "healthy"),
        })
    return rows
