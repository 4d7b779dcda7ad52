"""A routed queue (a task with a priority, a task with a rate limit): every job of it goes
through admission. Tasks record nothing themselves: tests read the order and overlap of
starts from the job events."""

from __future__ import annotations

import asyncio

from app.components.worker import current_job, task


async def step(tag: str = "") -> str:
    return tag


async def hold(seconds: float = 0.3) -> str:
    await asyncio.sleep(seconds)
    return current_job().worker_id


async def hold_first(seconds: float = 60.0) -> int:
    """Holds its slot on the first attempt only (a worker killed under it comes back fast)."""
    if current_job().attempt == 1:
        await asyncio.sleep(seconds)
    return current_job().attempt


@task(priority="high")
async def urgent(tag: str = "") -> str:
    return tag


@task(rate_limit="3/s")
async def limited() -> None:
    return None


class WorkerSettings:
    queue_name = "routed"
    functions = [step, hold, hold_first, urgent, limited]
