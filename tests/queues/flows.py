"""Tasks of the workflow tests (tests/test_workflows.py): queue ``flows``; the same tasks are
served as ``flows_b`` and ``flows_c`` (flows_b.py, flows_c.py) so one run can mix engines."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from app.components.worker import PermanentError, current_job


async def split(n: int) -> dict[str, object]:
    return {"items": list(range(1, n + 1)), "count": n}


async def square(x: int, ms: int = 0) -> int:
    if ms:
        await asyncio.sleep(ms / 1000)
    return x * x


async def total(values: list[int]) -> int:
    return sum(v or 0 for v in values)


async def join(**parts: object) -> dict[str, object]:
    return dict(parts)


async def where() -> dict[str, str]:
    job = current_job()
    return {"queue": job.queue, "engine": job.engine, "job_id": job.job_id}


async def fail(message: str = "step failed") -> None:
    raise PermanentError(message)


async def fail_unless_file(path: str) -> str:
    """Fails until ``path`` exists: a step a test makes pass on a retry of the run."""
    if not os.path.exists(path):
        raise PermanentError(f"{path} is missing")
    return "ok"


async def fails_before(path: str, tries: int) -> int:
    """Fails (an ordinary, retryable error) until called ``tries`` times: a step's ``retry``
    must be the only retry (the task's own ``max_tries`` of 3 would make it pass on one launch)."""
    with open(path, "a") as fh:
        fh.write("x\n")
    count = len(Path(path).read_text().splitlines())
    if count < tries:
        raise RuntimeError(f"call {count} of {tries}")
    return count


async def append_line(path: str, line: str = "x") -> str:
    with open(path, "a") as fh:
        fh.write(f"{line}\n")
    return line


async def kill_once(marker: str) -> str:
    """SIGKILLs its worker the first time (leaving ``marker``), succeeds on the redelivery."""
    if not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


async def hold_until_file(path: str, timeout: float = 30.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not os.path.exists(path):
        if loop.time() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)
    return "released"


FUNCTIONS = [split, square, total, join, where, fail, fail_unless_file, fails_before, append_line, kill_once,
             hold_until_file]


class WorkerSettings:
    functions = FUNCTIONS
    queue_name = "flows"
    max_jobs = 20
    max_tries = 3
    job_timeout = 60
