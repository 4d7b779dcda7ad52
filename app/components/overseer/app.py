"""The dashboard as a router a FastAPI app mounts, and as an app of its own (`app dashboard`).

Mount it in your own app::

    from app.components.overseer import overseer_router
    api.include_router(overseer_router(prefix="/overseer"))

The routes carry the prefix themselves (pages link to each other under it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from app.components.overseer.api import add_api
from app.components.overseer.pages import add_pages
from app.components.overseer.state import Overseer
from app.core.errors import AppError
from app.core.redis import explain
from app.core.settings import Settings, get_settings


def overseer_router(settings: Settings | None = None, prefix: str = "", overseer: Overseer | None = None) -> APIRouter:
    """The dashboard's pages, JSON API, SSE feed and /metrics, under ``prefix``."""
    overseer = overseer or Overseer(settings or get_settings(), prefix)
    router = APIRouter()
    router.overseer = overseer  # type: ignore[attr-defined]  # for the host app's shutdown: await router.overseer.close()
    add_api(router, overseer)
    add_pages(router, overseer)
    return router


def add_error_handlers(app: FastAPI, settings: Settings | None = None) -> None:
    """Redis trouble and the layer's own errors as one JSON line (503 / 400), not a 500 traceback."""

    @app.exception_handler(RedisError)
    async def redis_error(request: Request, exc: RedisError) -> JSONResponse:
        return JSONResponse({"detail": str(explain(exc, settings or get_settings()))}, status_code=503)

    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)


def create_app(settings: Settings | None = None) -> FastAPI:
    overseer = Overseer(settings or get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await overseer.close()

    app = FastAPI(title="Overseer", lifespan=lifespan, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.include_router(overseer_router(overseer=overseer))
    add_error_handlers(app, overseer.settings)
    return app
