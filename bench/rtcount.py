"""Run a Python module with every Redis round trip counted by the code that made it.

    python -m bench.rtcount OUT.json -m app worker load_test --backend arq

A round trip is one ``send_packed_command`` of redis-py (sync or asyncio): one command, one
pipeline, one script call, one blocking read. Each is tagged with the innermost caller
outside redis-py/asyncio (``file:function``). SIGUSR1 writes the counts so far to OUT.json
(with a sequence number); they are written once more at exit.
"""

from __future__ import annotations

import collections
import json
import os
import runpy
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

SKIP = ("/redis/", "/asyncio/", "contextlib.py", "threading.py", "concurrent/futures", "functools.py",
        "rtcount.py", "/anyio/", "app/core/redis.py", "app/core/redis_cancel.py")

counts: collections.Counter[str] = collections.Counter()
lock = threading.Lock()
snapshots = 0


def tag_of(frame: FrameType | None) -> str:
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in SKIP):
            path = Path(name)
            where = name.split("site-packages/")[-1] if "site-packages" in name else str(path).split("/app/components/", 1)[-1] if "/app/components/" in name else str(path)
            return f"{where}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def count(frame: FrameType | None) -> None:
    tag = tag_of(frame)
    with lock:
        counts[tag] += 1


def install() -> None:
    import redis.asyncio.connection as aconn
    import redis.connection as sconn

    try:  # the layer replaces the asyncio send (app/core/redis_cancel.py): count around its version
        import app.core.redis_cancel  # noqa: F401
    except ImportError:
        pass

    sync_send = sconn.AbstractConnection.send_packed_command
    async_send = aconn.AbstractConnection.send_packed_command

    def send(self: Any, *args: Any, **kwargs: Any) -> Any:
        count(sys._getframe(1))
        return sync_send(self, *args, **kwargs)

    async def asend(self: Any, *args: Any, **kwargs: Any) -> Any:
        count(sys._getframe(1))
        return await async_send(self, *args, **kwargs)

    sconn.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    aconn.AbstractConnection.send_packed_command = asend  # type: ignore[method-assign]


def snapshot() -> dict[str, Any]:
    with lock:
        return {"seq": snapshots, "counts": dict(counts)}


def write(out: Path) -> None:
    global snapshots
    snapshots += 1
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot()))
    os.replace(tmp, out)


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2] != "-m":
        raise SystemExit("usage: python -m bench.rtcount OUT.json -m MODULE [ARGS...]")
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    install()
    signal.signal(signal.SIGUSR1, lambda *_: write(out))
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        write(out)


if __name__ == "__main__":
    main()
