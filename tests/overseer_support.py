"""Starting `app dashboard` as a real subprocess for the dashboard's API and browser tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tests.conftest import ROOT, wait_until

TOKEN = "test-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dashboard:
    def __init__(self, env: dict[str, str], port: int | None = None, token: str | None = TOKEN, **extra: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, **{k.upper(): str(v) for k, v in extra.items()}}
        if token:
            self.env["DASHBOARD_TOKEN"] = token
        else:
            self.env.pop("DASHBOARD_TOKEN", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Dashboard:
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "dashboard", "--port", str(self.port)],
                                     env=self.env, cwd=ROOT)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"dashboard exited with {self.proc.returncode}")
            try:
                return httpx.get(f"{self.url}/api/workers", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, interval=0.05, what="dashboard answering")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def dashboard(env: dict[str, str], **kwargs: object) -> Iterator[Dashboard]:
    board = Dashboard(env, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield board
    finally:
        board.stop()


def enqueue(env: dict[str, str], task: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "app", "enqueue", task, "--queue", "contract", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def finished(url: str, job_id: str) -> dict[str, Any] | None:
    job = httpx.get(f"{url}/api/jobs/{job_id}", timeout=10).json()
    return job if job.get("status") in ("completed", "failed", "cancelled") else None
