"""`app worker --reload`: restart the worker when Python files change (development only).

watchfiles finds the changes (set ``WATCHFILES_FORCE_POLLING=1`` on bind mounts where inotify
is blind); the worker runs as a child the way the supervisor runs its children: in a session of
its own from the fork on (a terminal's Ctrl-C reaches this reloader only), tied to our life
(``app.core.lifeline``), stopped with one SIGTERM (its graceful stop), a second signal passed on
as the hard exit.

Not ``watchfiles.run_process``, whose Ctrl-C handling lost or doubled signals:
- it relies on Python's default SIGINT handler (KeyboardInterrupt), which Python does not
  install in a process started with SIGINT ignored, as every background job of a
  non-interactive shell is (``cmd &`` in a script, CI): Ctrl-C or ``kill -INT`` did nothing;
- a KeyboardInterrupt that landed while it waited for a worker stopping for a reload sent that
  worker a second SIGINT, its hard exit, cutting its running jobs short;
- its worker joined a session of its own only once Python had started, so a Ctrl-C before
  that reached it as well as the reloader.
Here signal handlers only record the signal; the main loop acts on it, so one signal is one
SIGTERM to the worker whatever the loop was doing (watching, stopping a worker, starting one).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import watchfiles

from app.core.lifeline import child_env

logger = logging.getLogger(__name__)

HARD_EXIT_GRACE_S = 2.0  # after a second signal, a worker still alive is killed
STOP_MARGIN_S = 20.0  # past the worker's own limit (grace + 15 s, process.STOP_MARGIN_S): killed
POLL_S = 0.05


class Reloader:
    def __init__(self, argv: list[str], grace: float) -> None:
        self.argv = argv
        self.grace = grace
        self.signals = 0
        self.stopping = threading.Event()  # watchfiles' stop_event: ends the watch within a step
        self.child: subprocess.Popen[bytes] | None = None

    def on_signal(self, signum: int, _frame: Any) -> None:
        """Record only; acting here could interleave with the loop's own SIGTERM to the worker."""
        self.signals += 1
        self.stopping.set()
        if self.signals == 1:
            logger.info("%s: stopping the worker gracefully", signal.Signals(signum).name)
        else:
            logger.warning("second %s: the worker exits now; running jobs return through crash recovery",
                           signal.Signals(signum).name)

    def start(self) -> None:
        self.child = subprocess.Popen(self.argv, env=child_env(), start_new_session=True)

    def stop_child(self) -> int:
        """Stop the worker (one SIGTERM; a second one once a second signal arrives); its exit code,
        0 when it ended as asked (cleanly, or by the SIGTERM before it had installed its handlers)."""
        child = self.child
        if child is None or child.poll() is not None:
            return 0
        child.send_signal(signal.SIGTERM)
        hard_sent = False
        kill_at = time.monotonic() + self.grace + STOP_MARGIN_S
        while True:
            try:
                code = child.wait(POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if self.signals > 1 and not hard_sent:
                hard_sent = True
                child.send_signal(signal.SIGTERM)
                # Two SIGTERMs in quick succession can merge into one pending signal: kill shortly after.
                kill_at = min(kill_at, time.monotonic() + HARD_EXIT_GRACE_S)
            if time.monotonic() >= kill_at:
                logger.warning("the worker (pid %d) did not stop: killing it", child.pid)
                child.kill()
                code = child.wait()
                break
        return 0 if code in (0, -signal.SIGTERM) else 1

    def run(self, paths: list[Path]) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)  # also when started with SIGINT ignored (a background job)
        self.start()
        try:
            for changes in watchfiles.watch(*paths, watch_filter=watchfiles.PythonFilter(),
                                            stop_event=self.stopping, raise_interrupt=False):
                if self.stopping.is_set():
                    break
                logger.info("%d file(s) changed: restarting the worker", len(changes))
                self.stop_child()
                if self.stopping.is_set():  # a signal while the worker stopped: no new one
                    break
                self.start()
        finally:
            code = self.stop_child()
        return code


def run_with_reload(grace: float) -> int:
    """Run ``app worker`` (this command without ``--reload``) until a signal; the exit code."""
    argv = [sys.executable, "-m", "app", *[a for a in sys.argv[1:] if a != "--reload"]]
    package = Path(__file__).resolve().parents[2]  # the app package
    here = Path.cwd().resolve()  # where a project's own queue packages usually live
    paths = [here] if package.is_relative_to(here) else [package, here]
    return Reloader(argv, grace).run(paths)
