"""The JSON API, the SSE feed and /metrics: the routes the pages' script and operators call.

Reads: ``GET /api/queues``, ``/api/workers``, ``/api/jobs/{id}``, ``/api/jobs?queue=&task=&status=``,
``/api/dead``, ``/api/events?after=ID``, ``/api/events/stream`` (SSE, honours ``Last-Event-ID``),
``/metrics``. Actions (bearer token, see ``actions``): ``POST /api/queues/{queue}/pause``,
``/resume``, ``POST /api/dead/{id}/retry``, ``POST /api/dead/retry``, ``POST /api/dead/purge``,
``POST /api/jobs/{id}/cancel``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from app.components.overseer import actions, history, overview, prom
from app.components.overseer.state import Overseer
from app.components.overseer.stream import feed, valid_id
from app.components.worker.validation import validate_job_id
from app.core.errors import AppError


def _job_id(job_id: str) -> str:
    try:
        return validate_job_id(job_id)
    except AppError as exc:
        raise HTTPException(422, str(exc)) from None


def add_api(router: APIRouter, overseer: Overseer) -> None:
    p = overseer.prefix

    @router.get(f"{p}/api/queues")
    async def get_queues() -> list[dict[str, Any]]:
        await overseer.fold()
        return await overview.queues(overseer.client, overseer.adapters)

    @router.get(f"{p}/api/workers")
    async def get_workers(queue: str | None = None) -> list[dict[str, Any]]:
        return await overview.workers(overseer.client, queue)

    @router.get(f"{p}/api/jobs")
    async def get_jobs(queue: str | None = None, task: str | None = None, status: str | None = None,
                       limit: int = 50) -> list[dict[str, Any]]:
        return await history.recent_jobs(overseer.client, queue or None, task or None, status or None,
                                      max(1, min(limit, 500)))

    @router.get(f"{p}/api/jobs/{{job_id}}")
    async def get_job(job_id: str) -> dict[str, Any]:
        found = await history.job(overseer.client, _job_id(job_id))
        if found is None:
            raise HTTPException(404, f"no job {job_id!r}: unknown id, or its record expired")
        return found

    @router.get(f"{p}/api/dead")
    async def get_dead(queue: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return await history.dead_letters(overseer.client, queue or None, max(1, min(limit, 500)), max(0, offset))

    @router.get(f"{p}/api/events")
    async def get_events(after: str | None = None, queue: str | None = None, type: str | None = None,
                         task: str | None = None, job: str | None = None, limit: int = 100) -> list[dict[str, str]]:
        return await history.events_after(overseer.client, valid_id(after), max(1, min(limit, 1000)),
                                       queue=queue or None, type_=type or None, task=task or None, job=job or None)

    @router.get(f"{p}/api/events/stream")
    async def stream_events(request: Request, after: str | None = None, queue: str | None = None,
                            type: str | None = None, task: str | None = None,
                            job: str | None = None) -> StreamingResponse:
        last = valid_id(request.headers.get("last-event-id")) or valid_id(after)
        filters = {"queue": queue or None, "type_": type or None, "task": task or None, "job": job or None}
        client = overseer.client
        return StreamingResponse(
            feed(client.redis, client.keys.events, last, filters, request.is_disconnected),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get(f"{p}/metrics")
    async def metrics() -> Response:
        return Response(await prom.exposition(overseer), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.post(f"{p}/api/queues/{{queue}}/pause")
    async def pause(queue: str, request: Request) -> dict[str, Any]:
        actions.check_token(overseer, request)
        return await actions.pause(overseer.client, queue, True)

    @router.post(f"{p}/api/queues/{{queue}}/resume")
    async def resume(queue: str, request: Request) -> dict[str, Any]:
        actions.check_token(overseer, request)
        return await actions.pause(overseer.client, queue, False)

    @router.post(f"{p}/api/dead/retry")
    async def retry_all(request: Request, queue: str | None = None) -> dict[str, Any]:
        actions.check_token(overseer, request)
        return await actions.retry_all(overseer.client, queue or None)

    @router.post(f"{p}/api/dead/purge")
    async def purge(request: Request, queue: str | None = None) -> dict[str, Any]:
        actions.check_token(overseer, request)
        return await actions.purge_dead(overseer.client, queue or None)

    @router.post(f"{p}/api/dead/{{job_id}}/retry")
    async def retry(job_id: str, request: Request) -> dict[str, Any]:
        actions.check_token(overseer, request)
        return await actions.retry_dead(overseer.client, _job_id(job_id))

    @router.post(f"{p}/api/jobs/{{job_id}}/cancel")
    async def cancel(job_id: str, request: Request) -> dict[str, Any]:
        actions.check_token(overseer, request)
        return await actions.cancel(overseer.client, _job_id(job_id))
