"""Dashboard pages with a million jobs waiting and 100,000 in history (issue 14).

On a private Redis: run ``--history`` no-op jobs through a real worker (they fill the event
stream, trimmed to 100,000 entries, and leave their records), then enqueue ``--jobs`` waiting
no-op jobs with no worker running, start ``app dashboard`` and time every page and API read
(wall time of the HTTP request from this process, ``--repeat`` times, median and max).

    python bench/overseer.py                       # 1,000,000 waiting, 100,000 done, arq
    python bench/overseer.py --jobs 200000 --history 20000 --engine taskiq

Writes ``bench/results/overseer.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis  # noqa: E402

from bench.common import WorkerProc, pick_redis_server, start_redis  # noqa: E402
from bench.million import env_for, fill  # noqa: E402

QUEUE = "load_test"
PATHS = ["/", "/workers", "/events", "/jobs", "/jobs?queue=load_test&status=completed", "/jobs/{job}", "/dead",
         "/api/queues", "/api/workers", "/api/jobs?queue=load_test", "/api/jobs/{job}", "/api/dead",
         "/api/events?limit=100", "/metrics"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def rows_of(url: str, engine: str) -> list[dict[str, Any]]:
    from app.components.worker.api import WorkerClient
    from app.components.worker.metrics import queue_metrics
    from app.core.settings import load_settings

    client = WorkerClient(load_settings(_env_file=None, redis_url=url, worker_backend=engine))
    try:
        return await queue_metrics(client)
    finally:
        await client.close()


def run_history(url: str, env: dict[str, str], engine: str, jobs: int, client: redis.Redis) -> float:
    """``jobs`` no-op jobs through one worker (4 processes); returns the seconds it took."""
    asyncio.run(fill(url, engine, jobs))
    started = time.perf_counter()
    log = ROOT / "bench" / "results" / "logs" / f"overseer-history-{engine}.log"
    worker = WorkerProc([sys.executable, "-m", "app", "worker", QUEUE, "--backend", engine, "--processes", "4"],
                        env, log)
    try:
        while True:
            queue = next(r for r in asyncio.run(rows_of(url, engine)) if r["queue"] == QUEUE)
            if queue["ready"] == 0 and queue["running"] == 0 and queue["delayed"] == 0:
                break
            worker.check()
            time.sleep(2)
    finally:
        worker.stop()
    return time.perf_counter() - started


def measure(base: str, job_id: str, repeat: int) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(timeout=60) as http:
        for path in PATHS:
            url = base + path.replace("{job}", job_id)
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                answer = http.get(url)
                times.append((time.perf_counter() - started) * 1000)
                assert answer.status_code == 200, (path, answer.status_code, answer.text[:200])
            times.sort()
            rows.append({"path": path, "median_ms": round(times[len(times) // 2], 1), "max_ms": round(times[-1], 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--engine", default="arq")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--redis-server", default=None)
    args = parser.parse_args()

    server = start_redis(pick_redis_server(args.redis_server))
    client = redis.Redis.from_url(server.url)
    env = env_for(server.url, args.engine)
    board = None
    try:
        history_s = run_history(server.url, env, args.engine, args.history, client) if args.history else 0.0
        print(f"history: {args.history:,} jobs run in {history_s:.0f}s", flush=True)
        rate, middle = asyncio.run(fill(server.url, args.engine, args.jobs))
        print(f"waiting: {args.jobs:,} jobs enqueued at {rate:,.0f}/s", flush=True)
        port = free_port()
        board = subprocess.Popen([sys.executable, "-m", "app", "dashboard", "--port", str(port)], env=env, cwd=ROOT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/api/workers", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the dashboard never answered"
            time.sleep(0.2)
        httpx.get(f"{base}/metrics", timeout=120)  # the first fold counts the whole stream once
        rows = measure(base, middle, args.repeat)
    finally:
        if board is not None:
            board.terminate()
            board.wait(10)
        client.close()
        server.cleanup()
    result = {"engine": args.engine, "waiting": args.jobs, "history": args.history, "pages": rows,
              "stream_entries": "trimmed to ~100,000 (WORKER_EVENTS_MAXLEN)"}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "overseer.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.jobs:,} waiting, {args.history:,} in history, {args.engine}; ms over {args.repeat} requests\n")
    print("| path | median ms | max ms |\n|---|---:|---:|")
    for row in rows:
        print(f"| `{row['path']}` | {row['median_ms']} | {row['max_ms']} |")


if __name__ == "__main__":
    main()
