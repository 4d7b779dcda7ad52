"""This host's clock, with an injectable offset for tests of clock skew.

Times that are compared across processes or hosts (heartbeat ages, the reaper's cutoff,
due times of delayed jobs) must come from Redis (``TIME`` inside a script), never from
here: hosts disagree. This clock is for what stays local (log lines, durations measured
by one process). ``APP_CLOCK_OFFSET_MS`` shifts it, so a test can run a worker whose clock
is minutes ahead or behind and check that nothing depends on it.
"""

from __future__ import annotations

import os
import time

OFFSET_MS = int(os.environ.get("APP_CLOCK_OFFSET_MS", "0") or 0)


def now_ms() -> int:
    return int(time.time() * 1000) + OFFSET_MS


def now_s() -> float:
    return time.time() + OFFSET_MS / 1000
