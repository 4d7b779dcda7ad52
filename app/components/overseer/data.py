"""What the pages and the JSON API show, read from Redis only (never from the dashboard's memory).

Every read is bounded by what a person looks at, not by what Redis holds: queue counts are
O(queues) (``ZCARD``/``XLEN``-like counts), recent jobs and run-time percentiles come from a
bounded ``XREVRANGE`` of the newest events, a job's trail from the stream between its own
timestamps. Nothing scans every job key, so a million waiting jobs do not slow a page.
"""

from __future__ import annotations

import json
from typing import Any

from app.components.overseer import optional
from app.components.overseer.counters import empty_minutes, per_minute
from app.components.worker import config as queue_config
from app.components.worker.engine_switch import live_engine_beats, waiting_in
from app.components.worker.engines import engine_class
from app.components.worker.events import _decode
from app.components.worker.health import Thresholds, list_workers, redis_now_ms
from app.components.worker.metrics import running_jobs
from app.components.worker.routing.stats import routing_state
from app.core.settings import ENGINES

HISTORY_SAMPLE = 5000  # newest events read, at most, for "recent jobs"
HISTORY_PAGE = 500
PERCENTILE_SAMPLE = 2000  # newest events read for p50/p95
TRAIL_PAGE = 10_000
TRAIL_PAGES = 5
TERMINAL = ("completed", "failed", "cancelled")
STATUS_OF_EVENT = {"job.enqueued": "queued", "job.started": "running", "job.completed": "completed",
                   "job.retried": "delayed", "job.failed": "failed"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    try:
        return int(float(_text(value)))
    except (TypeError, ValueError):
        return None


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
        event = _decode(fields)
        if event.get("type") in ("job.completed", "job.failed", "job.retried") and event.get("duration_ms"):
            try:
                values.setdefault(event.get("queue", ""), []).append(float(event["duration_ms"]))
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
        routed_waiting = sum(c["high"] + c["low"] for c in routing["waiting"].values())
        rows.append({
            "queue": name, "engine": engine, "ready": stats.ready + max(0, stats.running - running) + routed_waiting,
            "delayed": int(await client.redis.zcard(keys.delayed(name))), "running": running, "failed": stats.dead,
            "per_minute": _last_minute(history.get(name, []), now),
            "workers": sum(1 for w in live_workers if w["queue"] == name and w["state"] == "healthy"),
            "paused": routing["paused"], "routed": routing["routed"], "waiting_by_group": routing["waiting"],
            "max_concurrency": adapter.config.max_concurrency or None, "leases": routing["leases"],
        })
    for name, broken in sorted(client.registry.broken.items()):
        rows.append({
            "queue": name, "engine": None, "ready": None, "delayed": None, "running": None, "failed": None,
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
        row["dead"] = int(await client.redis.zcard(client.keys.dead(name)))
        row["run_time"] = times.get(name, {"p50_ms": None, "p95_ms": None, "sample": 0})
        row["history"] = history.get(name) or empty_minutes(now)
    return rows


async def workers(client: Any, queue: str | None = None) -> list[dict[str, Any]]:
    """Workers with a heartbeat key, their health state (Dagu's thresholds, from settings)."""
    return await list_workers(client.redis, client.keys, Thresholds.from_settings(client.settings), queue)


def _event(entry_id: Any, fields: Any) -> dict[str, str]:
    event = _decode(fields)
    event["id"] = _text(entry_id)
    return event


def matches(event: dict[str, str], queue: str | None = None, type_: str | None = None,
            task: str | None = None, job: str | None = None) -> bool:
    if queue and event.get("queue") != queue:
        return False
    if type_ and event.get("type") != type_ and not event.get("type", "").startswith(type_ + "."):
        return False
    if task and event.get("task") != task:
        return False
    return not (job and event.get("job_id") != job)


async def events_after(client: Any, after: str | None, limit: int = 100, **filters: str | None) -> list[dict[str, str]]:
    """Events after stream id ``after`` (oldest first); without ``after``, the newest ``limit``
    (oldest first). Reads at most ten pages of the stream to find ``limit`` matches."""
    out: list[dict[str, str]] = []
    if after:
        lower = f"({after}"
        for _ in range(10):
            entries = await client.redis.xrange(client.keys.events, min=lower, max="+", count=1000)
            for entry_id, fields in entries:
                event = _event(entry_id, fields)
                if matches(event, **filters):
                    out.append(event)
                    if len(out) >= limit:
                        return out
            if len(entries) < 1000:
                break
            lower = f"({_text(entries[-1][0])}"
        return out
    upper = "+"
    for _ in range(10):
        entries = await client.redis.xrevrange(client.keys.events, max=upper, min="-", count=1000)
        for entry_id, fields in entries:
            event = _event(entry_id, fields)
            if matches(event, **filters):
                out.append(event)
                if len(out) >= limit:
                    return out[::-1]
        if len(entries) < 1000:
            break
        upper = f"({_text(entries[-1][0])}"
    return out[::-1]


async def recent_jobs(client: Any, queue: str | None = None, task: str | None = None,
                      status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Jobs seen in the newest events (at most ``HISTORY_SAMPLE``), newest first, with status
    and timings from their record (while it lives), else from their events.

    There is no index of jobs per queue; the event stream is one, bounded and newest first.
    It is read a page at a time and no further than needed to fill the page asked for."""
    jobs: dict[str, dict[str, Any]] = {}
    upper, read = "+", 0
    while read < HISTORY_SAMPLE:
        entries = await client.redis.xrevrange(client.keys.events, max=upper, min="-", count=HISTORY_PAGE)
        read += len(entries)
        for entry_id, fields in entries:
            jid = _raw(fields, "job_id")
            if not jid or (queue and _raw(fields, "queue") != queue) or (task and _raw(fields, "task") != task):
                continue
            kind = _raw(fields, "type")
            row = jobs.get(jid)
            if row is None:
                row = jobs[jid] = {
                    "job_id": jid, "queue": _raw(fields, "queue"), "task": _raw(fields, "task"),
                    "engine": _raw(fields, "backend"), "status": STATUS_OF_EVENT.get(kind, ""),
                    "attempt": _int(_raw(fields, "attempt")), "enqueued_at": None, "started_at": None,
                    "finished_at": None, "duration_ms": None, "error": _raw(fields, "error") or None}
                if kind in ("job.completed", "job.failed"):
                    row["finished_at"] = _int(_text(entry_id).partition("-")[0])
                    row["duration_ms"] = _int(_raw(fields, "duration_ms"))
                    if (row["error"] or "").startswith("Cancelled:"):
                        row["status"] = "cancelled"
        if len(entries) < HISTORY_PAGE or sum(1 for r in jobs.values() if not status or r["status"] == status) >= limit:
            break
        upper = f"({_text(entries[-1][0])}"
    rows = [r for r in jobs.values() if not status or r["status"] == status][:limit] if status else list(jobs.values())
    rows = rows[:limit * 2]
    if rows:
        async with client.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.hmget(client.keys.job(row["job_id"]), "status", "enqueued_at", "started_at", "finished_at",
                           "attempt")
            records = await pipe.execute()
        for row, (state, enqueued, started, finished, attempt) in zip(rows, records, strict=True):
            if state is not None:
                row["status"] = _text(state)
                row["enqueued_at"] = _int(enqueued)
                row["started_at"] = _int(started)
                row["finished_at"] = _int(finished) or row["finished_at"]
                row["attempt"] = _int(attempt)
    if status:
        rows = [r for r in rows if r["status"] == status]
    return rows[:limit]


async def job(client: Any, job_id: str) -> dict[str, Any] | None:
    """A job's record, result (or error) and event trail; None when Redis knows nothing of it."""
    raw = await client.redis.hgetall(client.keys.job(job_id))
    record = {_text(k): _text(v) for k, v in raw.items()}
    result_raw = await client.redis.get(client.keys.result(job_id))
    result = json.loads(result_raw) if result_raw else None
    if not record and result is None:
        return None
    envelope: dict[str, Any] = {}
    if record.get("envelope"):
        try:
            envelope = json.loads(record["envelope"])
        except ValueError:
            envelope = {}
    source = result or {}
    enqueued = _int(record.get("enqueued_at")) or _int(source.get("enqueued_at"))
    status = record.get("status") or source.get("status") or "unknown"
    out = {
        "job_id": job_id, "status": status,
        "queue": record.get("queue") or source.get("queue"), "task": record.get("task") or source.get("task"),
        "engine": record.get("engine") or source.get("engine"),
        "attempts": _int(record.get("attempt")) if record.get("attempt") else source.get("attempts"),
        "worker": record.get("worker") or source.get("worker_id"),
        "enqueued_at": enqueued, "started_at": _int(record.get("started_at")) or _int(source.get("started_at")),
        "finished_at": _int(record.get("finished_at")) or _int(source.get("finished_at")),
        "args": envelope.get("args", []), "kwargs": envelope.get("kwargs", {}),
        "result": source.get("result") if source.get("status") == "completed" else None,
        "error_type": source.get("error_type"), "error": source.get("error"),
        "waiting": status in ("queued", "delayed"),
    }
    out["dead"] = bool(status == "failed" and out["queue"]
                       and await client.redis.zscore(client.keys.dead(out["queue"]), job_id) is not None)
    started, finished = out["started_at"], out["finished_at"]
    out["waited_ms"] = started - enqueued if started and enqueued else None  # before its last attempt
    out["ran_ms"] = finished - started if finished and started else None  # its last attempt
    out["events"], out["events_partial"] = await _trail(client, job_id, out)
    return out


def _raw(fields: dict[Any, Any], name: str) -> str:
    """One field of an undecoded stream entry (cheaper than decoding every entry read)."""
    value = fields.get(name.encode())
    if value is None:
        value = fields.get(name, "")
    return _text(value)


async def _trail(client: Any, job_id: str, record: dict[str, Any]) -> tuple[list[dict[str, str]], bool]:
    """The job's events. Stream ids are Redis ms, and the job record holds Redis times, so the
    trail is the range from its enqueue to its end (or to its enqueue alone while it has
    never started), read a page at a time up to a bound; past the bound, the entries at its
    last start and its end are read directly. True when the trail may miss some events."""
    since, started, ended = record["enqueued_at"], record["started_at"], record["finished_at"]
    if since is None:
        return [], True
    if ended is not None:
        upper = str(ended)
    elif record["status"] in ("queued", "delayed") and not record["attempts"]:
        upper = str(since)
    else:
        upper = "+"
    found: dict[str, dict[str, str]] = {}
    lower, partial = f"{since}-0", True
    for _ in range(TRAIL_PAGES):
        entries = await client.redis.xrange(client.keys.events, min=lower, max=upper, count=TRAIL_PAGE)
        for entry_id, fields in entries:
            if _raw(fields, "job_id") == job_id:
                event = _event(entry_id, fields)
                found[event["id"]] = event
        if len(entries) < TRAIL_PAGE:
            partial = False
            break
        lower = f"({_text(entries[-1][0])}"
    if partial:
        for moment in (started, ended):
            if moment is not None:
                for entry_id, fields in await client.redis.xrange(client.keys.events, min=moment, max=moment):
                    if _raw(fields, "job_id") == job_id:
                        found[_text(entry_id)] = _event(entry_id, fields)
    return sorted(found.values(), key=lambda e: tuple(int(x) for x in e["id"].split("-"))), partial


async def dead_letters(client: Any, queue: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
    """Dead jobs (failed after their last attempt), newest first, with their error: through
    ``routing.dead`` when this build has it, else read from the dead sets directly."""
    names = [queue] if queue else sorted(client.registry.queues)
    module = optional.dead()
    if module is not None:
        ttl = getattr(client.settings, "worker_dead_ttl_seconds", None)
        rows = await module.list_dead(client.redis, client.keys, names, limit, offset, ttl=ttl)
        counts = {q: int(await module.count_dead(client.redis, client.keys, [q])) for q in names}
        for row in rows:
            row.setdefault("failed_at", row.get("finished_at"))
        return {"total": sum(counts.values()), "by_queue": counts, "jobs": rows, "actions": True}
    counts = {q: int(await client.redis.zcard(client.keys.dead(q))) for q in names}
    merged: list[tuple[float, str, str]] = []
    for q in names:  # the newest offset+limit of each queue cover the merged page
        members = await client.redis.zrevrange(client.keys.dead(q), 0, offset + limit - 1, withscores=True)
        merged.extend((float(score), _text(member), q) for member, score in members)
    merged.sort(reverse=True)
    out = []
    for score, jid, q in merged[offset:offset + limit]:
        result_raw = await client.redis.get(client.keys.result(jid))
        record = json.loads(result_raw) if result_raw else {}
        task = record.get("task") or _text(await client.redis.hget(client.keys.job(jid), "task") or b"")
        out.append({"job_id": jid, "queue": q, "task": task, "failed_at": int(score),
                    "attempts": record.get("attempts"), "error_type": record.get("error_type"),
                    "error": record.get("error")})
    return {"total": sum(counts.values()), "by_queue": counts, "jobs": out, "actions": False}
