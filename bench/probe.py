"""The bodies every system under test runs, so all of them do the same work.

``job_start``/``job_end`` wrap the no-op and 10 ms jobs. In ``process`` mode (one worker
process: asyncio slots or threads) they count in memory and cost no Redis call; when the
``BENCH_TARGET``-th job ends, one RPUSH of ``{first, last, n}`` tells the bench the drain is
over. Workers that fork (Celery prefork, RQ) use ``redis`` mode: one pipelined round trip per
job (SET NX first-start + INCR). In ``shared`` mode (several worker processes, ``bench/scale.py``)
each process counts in memory and a thread of its own writes ``{first, last, n}`` to
``bench:p:<pid>`` (PSETEX, a command no system under test uses, so the bench can leave it out of
the per-job figures) every 50 ms while the count moves: no Redis call per job, and the bench
sums the processes. ``stamp`` records when a job starts (for pickup latency).
"""

from __future__ import annotations

import json
import os
import threading
import time

import redis

URL = os.environ.get("BENCH_REDIS_URL", "")
TARGET = int(os.environ.get("BENCH_TARGET", "0") or 0)
MODE = os.environ.get("BENCH_COUNT", "process")
DONE, STAMPS, FIRST, COUNT = "bench:done", "bench:stamps", "bench:first", "bench:count"

_lock = threading.Lock()
_local = threading.local()
_count = 0
_first: float | None = None
_last: float | None = None


def client() -> redis.Redis:
    """One connection per thread (and per forked child: the pid is part of the key)."""
    key = f"c{os.getpid()}"
    conn = getattr(_local, key, None)
    if conn is None:
        conn = redis.Redis.from_url(URL)
        setattr(_local, key, conn)
    return conn


def job_start() -> None:
    global _first
    if MODE == "redis":
        client().set(FIRST, repr(time.time()), nx=True)
    elif _first is None:
        _first = time.time()


def job_end() -> None:
    global _count, _last
    if MODE == "shared":
        now = time.time()
        with _lock:
            _count += 1
            _last = now
        return
    if MODE == "redis":
        n = client().incr(COUNT)
        if n == TARGET:
            first = float(client().get(FIRST) or 0)
            client().rpush(DONE, json.dumps({"first": first, "last": time.time(), "n": n}))
        return
    with _lock:
        _count += 1
        n = _count
    if n == TARGET:
        client().rpush(DONE, json.dumps({"first": _first, "last": time.time(), "n": n}))


def stamp() -> None:
    now = time.time()
    client().rpush(STAMPS, repr(now))


def _flush_forever() -> None:
    """``shared`` mode: publish this process's count while it moves (and once at start-up)."""
    key, written = f"bench:p:{os.getpid()}", None
    while True:
        with _lock:
            state = (_first, _last, _count)
        if state != written:
            try:
                client().psetex(key, 600_000, json.dumps({"first": state[0], "last": state[1], "n": state[2]}))
                written = state
            except redis.RedisError:
                pass
        time.sleep(0.05)


if MODE == "shared" and URL:
    threading.Thread(target=_flush_forever, name="bench-probe", daemon=True).start()
