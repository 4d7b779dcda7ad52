"""Queue metrics: what waits and runs, read from the engine's own keys and the layer's.

``ready`` comes from the engine's keys, ``failed`` from the layer's dead set of the queue
(``app dead``; plus any dead letter the engine holds itself), ``delayed`` from the layer's
delayed set, ``per_minute`` from the event stream. ``running`` comes from the layer, not the
engine: the engines cannot tell a running job from one a worker has only taken off the queue
(Dramatiq prefetches ``2 x threads`` messages per consumer into its ``.msgs`` hash; TaskIQ's
pending entries include what the receiver read ahead; arq's in-progress keys also outlive a
SIGKILLed worker). So ``running`` is the sum of ``running`` in the heartbeats of the queue's
live workers (not offline, not stopped); messages an engine holds beyond that are still
waiting and are counted in ``ready``. The heartbeat is refreshed every
``WORKER_HEARTBEAT_INTERVAL``, so the figure may lag by one interval.
"""

from __future__ import annotations

from typing import Any

from app.components.worker import config as queue_config
from app.components.worker.engine_switch import live_engine_beats, waiting_in
from app.components.worker.engines import engine_class
from app.components.worker.envelope import now_ms
from app.components.worker.events import _decode
from app.components.worker.health import Thresholds, list_workers_of
from app.components.worker.keys import Keys
from app.components.worker.routing.stats import routing_state
from app.core.settings import ENGINES

WINDOW_MS = 60_000


RATE_SAMPLE = 10_000


async def rates_last_minute(redis: Any, keys: Keys) -> dict[str, dict[str, int]]:
    """Completed and failed per queue over the last minute, from the event stream.

    Reads at most ``RATE_SAMPLE`` of the newest events (newest first): under a load above
    that many events a minute, the counts are scaled up from the span the sample covers,
    so the command stays cheap however busy the queues are."""
    now = now_ms()
    since = now - WINDOW_MS
    rates: dict[str, dict[str, int]] = {}
    entries = await redis.xrevrange(keys.events, max="+", min=f"{since}-0", count=RATE_SAMPLE)
    for _, fields in entries:
        event = _decode(fields)
        kind = event.get("type")
        if kind in ("job.completed", "job.failed"):
            counts = rates.setdefault(event.get("queue", ""), {"completed": 0, "failed": 0})
            counts["completed" if kind == "job.completed" else "failed"] += 1
    if len(entries) >= RATE_SAMPLE:
        oldest = int(_text(entries[-1][0]).partition("-")[0])
        scale = WINDOW_MS / max(1, now - oldest)
        for counts in rates.values():
            for kind in counts:
                counts[kind] = round(counts[kind] * scale)
    return rates


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def running_jobs(workers: list[dict[str, Any]], queue: str) -> int:
    """Jobs running now on ``queue``, as its live workers last reported in their heartbeats."""
    return sum(
        int(w.get("running") or 0) for w in workers
        if w["queue"] == queue and w["state"] != "offline" and not w.get("stopped")
    )


async def queue_metrics(client: Any) -> list[dict[str, Any]]:
    """One row per known queue, O(queues): a few counts per queue, whatever waits.

    Works with no worker running (it reads what waits). The engine shown is the explicit
    choice, else the engine the live workers announce, else the one whose keys hold jobs.
    A queue whose module is broken gets a row with its ``error`` (a key only such rows have)
    and no counts."""
    settings = client.settings
    keys = client.keys
    thresholds = Thresholds.from_settings(settings)
    names = sorted(client.registry.queues)
    workers = await list_workers_of(client.redis, keys, thresholds, names)
    rates: dict[str, dict[str, int]] = {}
    for stream_keys in ({keys.for_queue(name) for name in names} if keys.cluster else {keys}):  # Cluster: per queue
        rates.update(await rates_last_minute(client.redis, stream_keys))
    rows = []
    for name, spec in sorted(client.registry.queues.items()):
        keys = client.keys.for_queue(name)  # its own slot on Redis Cluster
        live = await live_engine_beats(client.redis, keys, name, settings.worker_offline_after)
        explicit = queue_config.explicit_engine_for(spec, settings)
        if not explicit and not live:
            # No one chose and no worker runs: show the engine whose keys hold the queue's jobs.
            held = {engine: await waiting_in(client.redis, keys, name, engine) for engine in ENGINES}
            live = {engine: count for engine, count in held.items() if count}
        engine = queue_config.choose_engine(explicit, live, settings.worker_backend)
        cfg = queue_config.with_engine(queue_config.resolve(spec, settings), engine)
        adapter = engine_class(cfg.engine)(settings, keys, cfg)
        try:
            stats = await adapter.stats()
        finally:
            await adapter.close()
        delayed = await client.redis.zcard(keys.delayed(name))
        rate = rates.get(name, {"completed": 0, "failed": 0})
        running = running_jobs(workers, name)
        routing = await routing_state(client.redis, keys, name)
        routed_waiting = sum(c["high"] + c["low"] for c in routing["waiting"].values())
        ready = stats.ready + max(0, stats.running - running) + routed_waiting
        rows.append({
            "queue": name, "engine": cfg.engine, "ready": ready, "delayed": delayed,
            "running": running, "failed": stats.dead + await client.redis.zcard(keys.dead(name)), "per_minute": rate,
            "workers": sum(1 for w in workers if w["queue"] == name and w["state"] == "healthy"),
            "paused": routing["paused"], "routed": routing["routed"], "waiting_by_group": routing["waiting"],
            "max_concurrency": cfg.max_concurrency or None, "leases": routing["leases"],
        })
    for name, broken in sorted(client.registry.broken.items()):
        rows.append({
            "queue": name, "engine": None, "ready": None, "delayed": None, "running": None, "failed": None,
            "per_minute": {"completed": 0, "failed": 0},
            "workers": sum(1 for w in workers if w["queue"] == name and w["state"] == "healthy"),
            "error": broken.reason,
        })
    return rows
