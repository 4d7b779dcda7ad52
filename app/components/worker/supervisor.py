"""Runs N worker processes of one queue, restarts one that dies, forwards signals.

A child that dies (SIGKILL, OOM) is restarted with backoff (1 s, doubling to 30 s, reset
after a minute of good health) without touching its siblings. The jobs it held come back
through crash recovery. SIGTERM/SIGINT are passed to every child; the supervisor exits
when they have all stopped.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from app.components.worker.process import WorkerOptions

logger = logging.getLogger(__name__)


@dataclass
class Child:
    index: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 1.0
    restart_at: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv)
        self.started = time.monotonic()
        logger.info("started worker process %d (pid %d)", self.index, self.process.pid)


def child_argv(options: WorkerOptions, index: int) -> list[str]:
    argv = [sys.executable, "-m", "app", "worker", options.queue, "--processes", "1"]
    if options.backend:
        argv += ["--backend", options.backend]
    if options.threads:
        argv += ["--threads", str(options.threads)]
    if options.worker_id:
        argv += ["--id", f"{options.worker_id}.{index}"]
    for key, value in options.labels.items():
        argv += ["--label", f"{key}={value}"]
    return argv


def supervise(options: WorkerOptions, processes: int) -> None:
    children = [Child(i, child_argv(options, i)) for i in range(1, processes + 1)]
    stopping = False
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        received.append(signum)
        stopping = True
        for child in children:
            if child.process and child.process.poll() is None:
                child.process.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for child in children:
        child.start()
    while True:
        alive = 0
        now = time.monotonic()
        for child in children:
            proc = child.process
            if proc is not None and proc.poll() is None:
                alive += 1
                if now - child.started > 60:
                    child.backoff = 1.0
                continue
            if stopping:
                continue
            if proc is not None:
                logger.warning("worker process %d (pid %d) exited with %s; restarting in %.0fs",
                               child.index, proc.pid, proc.returncode, child.backoff)
                child.process = None
                child.restart_at = now + child.backoff
                child.backoff = min(child.backoff * 2, 30.0)
            if now >= child.restart_at:
                child.start()
                alive += 1
        if stopping and alive == 0:
            return
        time.sleep(0.2)
