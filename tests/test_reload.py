"""`app worker QUEUE --reload` restarts the worker when code changes (development)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from tests.conftest import ROOT, wait_until

TASK = '''
async def version() -> str:
    return "{version}"


class WorkerSettings:
    functions = [version]
    queue_name = "reloadable"
'''


def test_reload_restarts_the_worker_on_change(env: dict[str, str], start_worker: Any, tmp_path: Path,
                                              redis_url: str, prefix: str) -> None:
    package = tmp_path / "reload_example"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "reloadable.py"
    module.write_text(TASK.format(version="v1"))
    env.update({"PYTHONPATH": f"{tmp_path}:{ROOT}", "WORKER_QUEUE_PACKAGES": "reload_example",
                "WATCHFILES_FORCE_POLLING": "1"})
    client = redis.Redis.from_url(redis_url)

    def worker_pids() -> set[int]:
        keys = client.keys(f"{prefix}:heartbeat:reloadable:*")
        beats = [json.loads(v) for v in client.mget(keys)] if keys else []
        return {b["pid"] for b in beats if b and b.get("state") != "stopped"}

    def run_version() -> str:
        proc = subprocess.run([sys.executable, "-m", "app", "enqueue", "version", "--wait", "--timeout", "30"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    reloader = subprocess.Popen([sys.executable, "-m", "app", "worker", "reloadable", "--reload"], env=env,
                                cwd=tmp_path)
    try:
        first = wait_until(worker_pids, 30, what="the first worker")
        assert run_version() == "v1"
        module.write_text(TASK.format(version="version-2"))  # another size and a later mtime: any
        later = time.time() + 2                                # watcher (inotify or polling) sees it
        os.utime(module, (later, later))
        wait_until(lambda: worker_pids() - first, 60, what="a restarted worker")
        assert run_version() == "version-2"
    finally:
        reloader.terminate()
        reloader.wait(40)
        client.close()
