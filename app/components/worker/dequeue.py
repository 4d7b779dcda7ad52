"""Cancelling waiting jobs (`app dequeue`): never a silent drop, always a terminal event."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.components.worker import config as queue_config
from app.components.worker.envelope import now_ms
from app.components.worker.runtime import scripts

if TYPE_CHECKING:
    from app.components.worker.api import WorkerClient

REASON = "dequeued by operator"


async def _waiting_ids(client: WorkerClient, queue: str) -> list[str]:
    """Job ids of ``queue`` that wait (queued or delayed), from the layer's job records."""
    ids = []
    prefix = client.keys.job("")
    async for key in client.redis.scan_iter(match=f"{prefix}*", count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        q, status = await client.redis.hmget(name, "queue", "status")
        if q is not None and q.decode() == queue and status in (b"queued", b"delayed"):
            ids.append(name[len(prefix):])
    return ids


async def cancel_waiting(client: WorkerClient, queue: str, job_id: str | None = None) -> list[str]:
    script = client.redis.register_script(scripts.source("cancel"))
    keep = queue_config.resolve(client.registry.queue(queue), client.settings).keep_result
    ids = [job_id] if job_id else await _waiting_ids(client, queue)
    cancelled = []
    for jid in ids:
        done = await script(
            keys=[client.keys.job(jid), client.keys.delayed(queue), client.keys.result(jid), client.keys.events],
            args=[jid, now_ms(), keep, client.settings.worker_events_maxlen, REASON],
        )
        if int(done):
            cancelled.append(jid)
    return cancelled
