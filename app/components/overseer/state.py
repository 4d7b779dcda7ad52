"""The dashboard's handle on Redis: one WorkerClient and one Folder per event loop.

Built lazily on the first request, inside the server's loop, so the same router works in
``app dashboard`` and mounted into a user's own FastAPI app. While requests come, a
background task folds the event stream into the counters every ``FOLD_EVERY_S`` seconds so
that /metrics and the overview seldom have more than a second of events to fold themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from app.components.overseer.counters import Folder
from app.core.settings import Settings

logger = logging.getLogger(__name__)

FOLD_EVERY_S = 1.0


class Overseer:
    def __init__(self, settings: Settings, prefix: str = "") -> None:
        from app.core.redis_cluster import DASHBOARD, refuse_feature

        refuse_feature(settings, DASHBOARD)
        self.settings = settings
        self.prefix = prefix.rstrip("/")
        self._client: Any = None
        self._folder: Folder | None = None
        self._task: asyncio.Task[None] | None = None
        self.adapters: dict[tuple[str, str], Any] = {}  # (queue, engine) -> engine adapter, for stats

    @property
    def token(self) -> str | None:
        secret = self.settings.dashboard_token
        value = secret.get_secret_value() if secret is not None else ""
        return value or None

    @property
    def client(self) -> Any:
        if self._client is None:
            from app.components.worker.api import WorkerClient

            self._client = WorkerClient(self.settings)
            self._folder = Folder(self._client.redis, self._client.keys)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._fold_forever(), name="overseer-fold")
        return self._client

    @property
    def folder(self) -> Folder:
        self.client  # noqa: B018 - builds the folder with the client
        assert self._folder is not None
        return self._folder

    async def fold(self) -> None:
        """Bring the counters up to date before answering; a Redis error here is the request's."""
        await self.folder.fold()

    async def _fold_forever(self) -> None:
        while True:
            await asyncio.sleep(FOLD_EVERY_S)
            try:
                assert self._folder is not None
                await self._folder.fold()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next request reports Redis trouble itself
                logger.warning("overseer: folding the event stream failed: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for adapter in self.adapters.values():
            with contextlib.suppress(Exception):
                await adapter.close()
        self.adapters = {}
        if self._client is not None:
            await self._client.close()
        self._client = self._folder = self._task = None
