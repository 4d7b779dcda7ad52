"""Child processes that do not outlive the process that started them.

`app dev`, the worker supervisor and `--reload` start their children in sessions of their own, so a
terminal's Ctrl-C (SIGINT to the whole foreground process group) reaches only the parent,
which then stops each child once, gracefully. The price: nothing the terminal does reaches
the children any more, and a parent killed with SIGKILL would leave them running forever.
This module closes that gap:

- ``child_env()`` marks a child's environment with the parent's pid; ``die_with_parent()``,
  called first thing in that child, asks Linux to send it SIGTERM when the parent dies
  (``prctl(PR_SET_PDEATHSIG)``, which also covers a parent that died before the call), and
  elsewhere polls ``getppid()`` from a daemon thread. SIGTERM, not SIGKILL: an orphaned
  worker still finishes or hands back its running jobs within its shutdown grace.
- ``pdeathsig_preexec()`` does the same for a program we cannot change (redis-server), as a
  ``preexec_fn``: the setting survives ``exec``.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so children must be
started from a thread that lives as long as the parent (the main thread, here).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

ENV = "APP_PARENT_PID"
PR_SET_PDEATHSIG = 1


def _prctl() -> Any | None:
    """libc's prctl, resolved in this process (never after a fork), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) marked so the child can tie its life to ours."""
    out = dict(os.environ if env is None else env)
    out[ENV] = str(os.getpid())
    return out


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child started with ``child_env()``: receive ``sig`` when the parent dies.

    The mark is removed from the environment so this process's own children (a task that
    runs a subprocess) are not tied to the wrong parent."""
    raw = os.environ.pop(ENV, None)
    if not raw or not raw.isdigit():
        return
    parent = int(raw)
    prctl = _prctl()
    if prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
        if os.getppid() != parent:  # the parent died before the call: nobody will signal us
            os.kill(os.getpid(), sig)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def pdeathsig_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes an exec'd program receive ``sig`` when we die (Linux only;
    None elsewhere). prctl is resolved here, before the fork, so the child only calls it."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec
