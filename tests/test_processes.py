"""Processes: a task's own cancellation, graceful stops under every signal path, no orphans,
Redis socket deadlines, and a password-protected Redis reached without a password."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.components.worker.api import WorkerClient
from app.core.errors import JobFailed
from app.core.redis_server import RedisServer
from tests.conftest import ROOT, wait_until
from tests.test_contract import trail, wait_trail

ENGINES = ["arq", "dramatiq", "taskiq"]


# ---- 1. a task's own CancelledError is a failed attempt, not a shutdown --------------------------------

@pytest.mark.parametrize("engine", ENGINES)
async def test_task_that_cancels_itself_fails_after_max_tries(engine: str, client: WorkerClient,
                                                              start_worker: Any) -> None:
    start_worker("contract", engine)
    job = await client.enqueue("cancels_itself")
    with pytest.raises(JobFailed) as failed:
        await job.result(30)
    assert failed.value.error_type == "TaskCancelled"
    assert (await job.info())["attempts"] == 3
    events = await wait_trail(client, job.job_id, "job.failed")
    assert [e["type"] for e in events] == ["job.enqueued", "job.started", "job.retried", "job.started",
                                           "job.retried", "job.started", "job.failed"]
    # No redelivery after the end: a later job runs, and the first one's trail has not grown.
    assert await (await client.enqueue("add", 1, 2)).result(30) == 3
    assert [e["type"] for e in await trail(client, job.job_id)] == [e["type"] for e in events]
    assert await job.status() == "failed"
