"""Jobs and events as the pages show them: recent jobs, a job's record and trail, events
after an id, dead letters. Read from Redis only, and bounded by what a person looks at.

There is no index of jobs per queue: recent jobs come from a bounded ``XREVRANGE`` of the
newest events, a job's trail from the stream between its own timestamps (stream ids are
Redis ms). Nothing scans every job key, so a million waiting jobs do not slow a page.
"""

from __future__ import annotations

import json
from typing import Any

from app.components.worker.events import _decode
from app.components.worker.routing import dead

HISTORY_SAMPLE = 5000  # newest events read, at most, for "recent jobs"
HISTORY_PAGE = 500
TRAIL_PAGE = 10_000
TRAIL_PAGES = 5
SLACK_MS = 1000
STATUS_OF_EVENT = {"job.enqueued": "queued", "job.started": "running", "job.completed": "completed",
                   "job.retried": "delayed", "job.failed": "failed"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    try:
        return int(float(_text(value)))
    except (TypeError, ValueError):
        return None


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
    last start and its end are read directly. True when the trail may miss some events.

    An entry's id can be a little later than the time its script wrote in the record (Redis
    6.2 stamps XADD with the clock of the moment, and never below the stream's last id), so
    each bound gets ``SLACK_MS`` and the read stops at the job's terminal event."""
    since, started, ended = record["enqueued_at"], record["started_at"], record["finished_at"]
    if since is None:
        return [], True
    if ended is not None:
        upper = str(ended + SLACK_MS)
    elif record["status"] in ("queued", "delayed") and not record["attempts"]:
        upper = str(since + SLACK_MS)
    else:
        upper = "+"
    found: dict[str, dict[str, str]] = {}

    def take(entries: list[Any]) -> bool:
        """Keep the job's entries; True once its terminal event is in."""
        for entry_id, fields in entries:
            if _raw(fields, "job_id") == job_id:
                event = _event(entry_id, fields)
                found[event["id"]] = event
                if event["type"] in ("job.completed", "job.failed"):
                    return True
        return False

    lower, partial = f"{since}-0", True
    for _ in range(TRAIL_PAGES):
        entries = await client.redis.xrange(client.keys.events, min=lower, max=upper, count=TRAIL_PAGE)
        if take(entries) or len(entries) < TRAIL_PAGE:
            partial = False
            break
        lower = f"({_text(entries[-1][0])}"
    if partial:
        for moment in (started, ended):
            if moment is not None:
                take(await client.redis.xrange(client.keys.events, min=moment, max=moment + SLACK_MS, count=TRAIL_PAGE))
    return sorted(found.values(), key=lambda e: tuple(int(x) for x in e["id"].split("-"))), partial


async def dead_letters(client: Any, queue: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
    """Dead jobs (failed after their last attempt), most recent failure first, with their error
    (``routing.dead``: expired entries are trimmed first)."""
    names = [queue] if queue else sorted(client.registry.queues)
    ttl = client.settings.worker_dead_ttl_seconds
    rows = await dead.list_dead(client.redis, client.keys, names, limit, offset, ttl=ttl)
    counts = {q: int(await dead.count_dead(client.redis, client.keys, [q])) for q in names}
    for row in rows:
        row.setdefault("failed_at", row.get("finished_at"))
    return {"total": sum(counts.values()), "by_queue": counts, "jobs": rows}
