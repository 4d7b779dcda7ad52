"""What a person may change from the dashboard: each action checks the bearer token first.

Without ``DASHBOARD_TOKEN`` the dashboard is read-only: every action answers 403 saying how
to allow them. With it, a request without ``Authorization: Bearer <token>`` (or with another
token) answers 401. Tokens are compared in constant time.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import HTTPException, Request

from app.components.overseer.state import Overseer
from app.components.worker.dequeue import cancel_waiting
from app.components.worker.routing import dead
from app.components.worker.routing import pause as pausing
from app.core.errors import AppError


def check_token(overseer: Overseer, request: Request) -> None:
    expected = overseer.token
    if expected is None:
        raise HTTPException(403, "read-only dashboard: set DASHBOARD_TOKEN and restart it to allow actions")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected.encode()):
        raise HTTPException(401, "this action needs the dashboard token: send Authorization: Bearer <DASHBOARD_TOKEN>",
                            headers={"WWW-Authenticate": "Bearer"})


def _known_queue(client: Any, queue: str) -> None:
    if queue not in client.registry.queues:
        known = ", ".join(sorted(client.registry.queues)) or "none"
        raise HTTPException(404, f"unknown queue {queue!r}: known queues are {known}")


async def pause(client: Any, queue: str, paused: bool) -> dict[str, Any]:
    _known_queue(client, queue)
    await (pausing.pause if paused else pausing.resume)(client.redis, client.keys, queue)
    return {"queue": queue, "paused": paused}


async def retry_dead(client: Any, job_id: str) -> dict[str, Any]:
    """Enqueue a dead job again under its id (``routing.dead.retry_dead``)."""
    try:
        await dead.retry_dead(client, job_id)
    except dead.NotDead as exc:
        raise HTTPException(404, str(exc)) from None
    except AppError as exc:
        raise HTTPException(409, str(exc)) from None
    return {"job_id": job_id, "retried": True}


async def retry_all(client: Any, queue: str | None) -> dict[str, Any]:
    if queue is not None:
        _known_queue(client, queue)
    return {"queue": queue or "every queue", "retried": int(await dead.retry_all(client, queue))}


async def purge_dead(client: Any, queue: str | None) -> dict[str, Any]:
    if queue is not None:
        _known_queue(client, queue)
        count = await dead.purge_dead(client.redis, client.keys, queue)
    else:
        count = await dead.purge_dead(client.redis, client.keys, queues=sorted(client.registry.queues))
    return {"queue": queue or "every queue", "purged": int(count)}


async def cancel(client: Any, job_id: str) -> dict[str, Any]:
    """Cancel a waiting job (queued or delayed): it ends at once with its terminal event."""
    raw = await client.redis.hmget(client.keys.job(job_id), "queue", "status")
    queue, status = ((v.decode() if isinstance(v, bytes) else v) for v in raw)
    if queue is None:
        raise HTTPException(404, f"no job {job_id!r}: unknown id, or its record expired")
    if status not in ("queued", "delayed"):
        raise HTTPException(409, f"job {job_id} is {status}: only a waiting (queued or delayed) job can be cancelled")
    if queue not in client.registry.queues:
        raise HTTPException(409, f"job {job_id} is on queue {queue!r}, which this dashboard does not know")
    done = await cancel_waiting(client, queue, job_id)
    if job_id not in done:
        raise HTTPException(409, f"job {job_id} started or ended meanwhile: it was not cancelled")
    return {"job_id": job_id, "cancelled": True}
