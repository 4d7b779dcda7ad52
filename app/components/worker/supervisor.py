"""Runs N worker processes of one queue, restarts one that dies, forwards signals.

A child that dies (SIGKILL, OOM) is restarted with backoff (1 s, doubling to 30 s, reset
after a minute of good health) without touching its siblings. The jobs it held come back
through crash recovery.

Signals: children run in sessions of their own, so a terminal's Ctrl-C (SIGINT to the whole
foreground process group) reaches the supervisor only. Whatever asked it to stop (Ctrl-C,
`docker stop`'s SIGTERM to PID 1, `kill -TERM`, a closed terminal's SIGHUP), the supervisor
sends each child one SIGTERM: the graceful stop (running jobs finish within
WORKER_SHUTDOWN_TIMEOUT, worker.stopped, exit 0). Before, the terminal's SIGINT reached each
child directly and the forwarded copy counted as a second signal, which is the hard exit.
A second signal to the supervisor is forwarded once more: that is the deliberate hard exit.
Children die with the supervisor (``app.core.lifeline``), so a SIGKILLed supervisor leaves
no orphans: they get SIGTERM and stop gracefully.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from app.components.worker.process import WorkerOptions
from app.core.lifeline import child_env

logger = logging.getLogger(__name__)

HARD_EXIT_GRACE_S = 2.0  # after a second signal, children still alive are killed


@dataclass
class Child:
    index: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 1.0
    restart_at: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=child_env(), start_new_session=True)
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
    if options.group:
        argv += ["--group", options.group]
    if options.scheduler and index == 1:  # one scheduler per supervisor is enough (any number would be safe)
        argv.append("--scheduler")
    return argv


def supervise(options: WorkerOptions, processes: int) -> int:
    """Run the children until a signal stops them all; the exit code: 0 when every child
    stopped cleanly, else 1."""
    children = [Child(i, child_argv(options, i)) for i in range(1, processes + 1)]
    stopping = False
    signals_seen = 0

    hard_deadline: list[float] = []

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping, signals_seen
        signals_seen += 1
        stopping = True
        if signals_seen == 1:
            logger.info("%s: stopping %d worker process(es) gracefully", signal.Signals(signum).name, len(children))
        else:
            logger.warning("second %s: worker processes exit now; running jobs return through crash recovery",
                           signal.Signals(signum).name)
        if signals_seen > 2:
            return
        if signals_seen == 2:
            # Two SIGTERMs sent to a child in quick succession can merge into one pending
            # signal, which it would take for the graceful one: kill what is left shortly after.
            hard_deadline.append(time.monotonic() + HARD_EXIT_GRACE_S)
        for child in children:
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    for child in children:
        child.start()
    while True:
        alive = 0
        now = time.monotonic()
        if hard_deadline and now >= hard_deadline[0]:
            for child in children:
                if child.process and child.process.poll() is None:
                    child.process.kill()
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
                if stopping and child.process is not None:  # a signal arrived while it started
                    child.process.send_signal(signal.SIGTERM)
        if stopping and alive == 0:
            clean = all(c.process is None or c.process.returncode == 0 for c in children)
            return 0 if clean else 1
        time.sleep(0.2)
