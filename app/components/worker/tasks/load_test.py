"""Tasks of the ``load_test`` queue: probes for CPU, I/O, memory, failures and overhead."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any


async def noop() -> None:
    """Returns at once: measures the layer's own cost per job."""
    return None


def cpu_intensive_task(iterations: int = 100_000) -> dict[str, Any]:
    """Hash a buffer ``iterations`` times (sync: runs on a worker thread)."""
    started = time.perf_counter()
    digest = b"seed"
    for _ in range(iterations):
        digest = hashlib.sha256(digest).digest()
    return {"iterations": iterations, "digest": digest.hex()[:16], "ms": round((time.perf_counter() - started) * 1000, 2)}


async def io_simulation_task(duration_ms: int = 100) -> dict[str, Any]:
    """Wait ``duration_ms`` like a network call would."""
    await asyncio.sleep(duration_ms / 1000)
    return {"duration_ms": duration_ms}


def memory_operations_task(size_mb: int = 10) -> dict[str, Any]:
    """Allocate and touch ``size_mb`` megabytes, then free them."""
    if size_mb < 0 or size_mb > 4096:
        raise ValueError("size_mb must be between 0 and 4096")
    block = bytearray(size_mb * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    total = sum(block[::4096])
    del block
    return {"size_mb": size_mb, "pages_touched": total}


async def failure_testing_task(failure_rate: float = 0.5) -> dict[str, Any]:
    """Fail with probability ``failure_rate`` (0..1), to exercise retries and failures."""
    if not 0 <= failure_rate <= 1:
        raise ValueError("failure_rate must be between 0 and 1")
    if random.random() < failure_rate:
        raise RuntimeError(f"simulated failure (failure_rate={failure_rate})")
    return {"failure_rate": failure_rate, "ok": True}
