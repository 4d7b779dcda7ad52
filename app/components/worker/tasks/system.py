"""Housekeeping tasks of the ``system`` queue."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


async def system_health_check() -> dict[str, Any]:
    """A quick look at the machine the worker runs on."""
    disk = shutil.disk_usage(tempfile.gettempdir())
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "status": "ok",
        "hostname": platform.node(),
        "python": platform.python_version(),
        "load_1m": round(load[0], 2),
        "disk_free_gb": round(disk.free / 1e9, 2),
        "checked_at": time.time(),
    }


def cleanup_temp_files(days_old: int = 7, directory: str | None = None, pattern: str = "app-*") -> dict[str, Any]:
    """Delete files matching ``pattern`` older than ``days_old`` days in the temp directory."""
    if days_old < 0:
        raise ValueError("days_old must be 0 or more")
    root = Path(directory or tempfile.gettempdir())
    cutoff = time.time() - days_old * 86400
    removed, freed = 0, 0
    for path in root.glob(pattern):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                freed += path.stat().st_size
                path.unlink()
                removed += 1
        except OSError:
            continue
    return {"directory": str(root), "removed": removed, "freed_bytes": freed}
