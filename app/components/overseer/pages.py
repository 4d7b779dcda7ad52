"""Server-rendered pages (Jinja2) and the package's own static files: no CDN, no bundler.

Each page renders its data on the server, so it reads without JavaScript. ``overseer.js``
then keeps it live: a region marked ``data-refresh`` is fetched again as HTML (the same
template, ``?partial=1``) once the previous answer came (a slow backend slows the refresh,
requests never pile up), and the events page follows the SSE feed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app.components.overseer import history, overview
from app.components.overseer.state import Overseer
from app.components.worker.events import TYPES

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".ico": "image/x-icon"}


def _ts(ms: Any) -> str:
    try:
        return datetime.fromtimestamp(int(ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def _ms(value: Any) -> str:
    if value is None or value == "":
        return "-"
    number = float(value)
    return f"{number / 1000:.2f} s" if number >= 1000 else f"{number:.0f} ms"


def _spark(history: list[dict[str, int]], outcome: str, width: int = 120, height: int = 24) -> str:
    """SVG polyline points for one outcome over the minutes shown."""
    if not history:
        return ""
    top = max(1, *(max(h["completed"], h["failed"]) for h in history))
    step = width / max(1, len(history) - 1)
    return " ".join(f"{i * step:.1f},{height - h[outcome] / top * (height - 2) - 1:.1f}" for i, h in enumerate(history))


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(ts=_ts, ms=_ms, spark=_spark,
                                 pretty=lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str))
    return templates


def add_pages(router: APIRouter, overseer: Overseer) -> None:
    p = overseer.prefix
    templates = _templates()

    def render(request: Request, page: str, partial: str | None, **context: Any) -> HTMLResponse:
        name = f"{page}_part.html" if partial else f"{page}.html"
        return templates.TemplateResponse(request, name, {
            "base": p, "page": page, "read_only": overseer.token is None, **context})

    @router.get(f"{p}/", response_class=HTMLResponse)
    async def overview_page(request: Request, partial: str | None = None) -> HTMLResponse:
        await overseer.fold()
        return render(request, "overview", partial, queues=await overview.queues(overseer.client, overseer.adapters))

    @router.get(f"{p}/workers", response_class=HTMLResponse)
    async def workers_page(request: Request, partial: str | None = None, queue: str | None = None) -> HTMLResponse:
        return render(request, "workers", partial, workers=await overview.workers(overseer.client, queue or None),
                      thresholds=overseer.settings)

    @router.get(f"{p}/events", response_class=HTMLResponse)
    async def events_page(request: Request, queue: str = "", type: str = "", task: str = "", job: str = "") -> HTMLResponse:
        filters = {"queue": queue, "type": type, "task": task, "job": job}
        rows = await history.events_after(overseer.client, None, 100, queue=queue or None, type_=type or None,
                                       task=task or None, job=job or None)
        newest = await overseer.client.redis.xrevrange(overseer.client.keys.events, count=1)
        last = newest[0][0].decode() if newest else "0-0"
        return render(request, "events", None, events=rows[::-1], filters=filters, after=last, types=TYPES,
                      queues=sorted(overseer.client.registry.queues))

    @router.get(f"{p}/jobs", response_class=HTMLResponse, response_model=None)
    async def jobs_page(request: Request, id: str = "", queue: str = "", task: str = "", status: str = "",
                   partial: str | None = None) -> Response:
        if id.strip():
            return RedirectResponse(f"{p}/jobs/{id.strip()}", status_code=303)
        rows = await history.recent_jobs(overseer.client, queue or None, task or None, status or None, 100)
        return render(request, "jobs", partial, jobs=rows, filters={"queue": queue, "task": task, "status": status},
                      queues=sorted(overseer.client.registry.queues))

    @router.get(f"{p}/jobs/{{job_id}}", response_class=HTMLResponse)
    async def job_page(request: Request, job_id: str, partial: str | None = None) -> HTMLResponse:
        found = await history.job(overseer.client, job_id)
        response = render(request, "job", partial, job=found, job_id=job_id)
        if found is None:
            response.status_code = 404
        return response

    @router.get(f"{p}/dead", response_class=HTMLResponse)
    async def dead_page(request: Request, queue: str = "", partial: str | None = None, offset: int = 0) -> HTMLResponse:
        letters = await history.dead_letters(overseer.client, queue or None, 50, max(0, offset))
        return render(request, "dead", partial, dead=letters, queue=queue, offset=max(0, offset),
                      queues=sorted(overseer.client.registry.queues))

    @router.get(f"{p}/static/{{name}}")
    async def static(name: str) -> FileResponse:
        path = STATIC / name
        if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers={"Cache-Control": "max-age=300"})
