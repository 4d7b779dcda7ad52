"""What a workflow step costs over a plain job, on one worker process.

On a private redis-server, one ``app worker load_test`` (``--threads 50``; its reconciler
advances the runs), task ``noop``:

- chain: ``--chain`` plain jobs one after another (enqueue, await the result, next) against a
  workflow of as many steps each depending on the previous: ms per step vs ms per job;
- fan-out: ``--items`` plain jobs enqueued at once (``enqueue_many``) against one parallel
  step over as many items with ``max_concurrent=50``: wall time, and Redis commands per item
  (``INFO commandstats`` delta over the whole run, every client: worker, reconciler, producer).

    python bench/workflows.py [--engine arq] [--chain 50] [--items 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.components.worker.api import JobRequest, WorkerClient  # noqa: E402
from app.components.workflows import Step, Workflow, Workflows  # noqa: E402
from app.core.redis_server import RedisServer  # noqa: E402
from app.core.settings import load_settings  # noqa: E402


def calls(r: Any) -> int:
    return sum(int(v["calls"]) for v in r.info("commandstats").values())


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    server = RedisServer().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WORKER_", "WORKFLOW_"))}
    env.update({"REDIS_URL": server.url, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING",
                "WORKER_KEEP_RESULT_SECONDS": "3600", "WORKER_EVENTS_MAXLEN": "1000000"})
    worker = subprocess.Popen([sys.executable, "-m", "app", "worker", "load_test", "--backend", args.engine,
                               "--threads", "50"], env=env, cwd=ROOT)
    r = redis.Redis.from_url(server.url)
    client = WorkerClient(load_settings(_env_file=None, redis_url=server.url, worker_backend=args.engine,
                                        worker_events_maxlen=1_000_000))
    flows = Workflows(client)
    out: dict[str, Any] = {"engine": args.engine, "chain": args.chain, "items": args.items}
    try:
        while not r.keys("worker:heartbeat:load_test:*"):
            await asyncio.sleep(0.05)
        await (await client.enqueue("noop", _queue="load_test")).result(30)  # warm up

        start = time.perf_counter()
        for _ in range(args.chain):
            await (await client.enqueue("noop", _queue="load_test")).result(30)
        out["chain_plain_ms_per_job"] = round((time.perf_counter() - start) * 1000 / args.chain, 2)

        steps = [Step(f"s{i}", task="noop", queue="load_test", depends=[f"s{i - 1}"] if i else [])
                 for i in range(args.chain)]
        start = time.perf_counter()
        run_id = await flows.start(Workflow("chain", steps))
        view = await flows.wait(run_id, 600)
        assert view["status"] == "completed", view["error"]
        out["chain_workflow_ms_per_step"] = round((time.perf_counter() - start) * 1000 / args.chain, 2)
        # The hand-off: a step's job.completed to the next step's job.enqueued (stream ids: Redis's clock).
        at: dict[tuple[str, str], int] = {}
        for entry_id, fields in r.xrange("worker:events"):
            job = fields.get(b"job_id", b"").decode()
            if job.startswith(f"wf:{run_id}:"):
                at[(fields[b"type"].decode(), job.split(":")[2])] = int(entry_id.decode().split("-")[0])
        gaps = sorted(at[("job.enqueued", f"s{i}")] - at[("job.completed", f"s{i - 1}")] for i in range(1, args.chain))
        out["chain_handoff_ms_p50"] = gaps[len(gaps) // 2]
        out["chain_handoff_ms_p90"] = gaps[int(len(gaps) * 0.9)]

        before, start = calls(r), time.perf_counter()
        jobs = await client.enqueue_many([JobRequest("noop", queue="load_test") for _ in range(args.items)])
        for job in jobs:
            await job.result(600)  # type: ignore[union-attr]
        out["fanout_plain_s"] = round(time.perf_counter() - start, 2)
        out["fanout_plain_commands_per_job"] = round((calls(r) - before) / args.items, 1)

        wf = Workflow("fan", [Step("map", task="noop", queue="load_test", parallel=list(range(args.items)),
                                   max_concurrent=50)])
        before, start = calls(r), time.perf_counter()
        view = await flows.wait(await flows.start(wf), 1200, interval=0.25)
        assert view["status"] == "completed", view["error"]
        out["fanout_workflow_s"] = round(time.perf_counter() - start, 2)
        out["fanout_workflow_commands_per_item"] = round((calls(r) - before) / args.items, 1)
        out["fanout_output_len"] = len(view["steps"]["map"]["output"])
    finally:
        await client.close()
        worker.terminate()
        worker.wait(30)
        r.close()
        server.cleanup()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="arq", choices=("arq", "dramatiq", "taskiq"))
    parser.add_argument("--chain", type=int, default=50)
    parser.add_argument("--items", type=int, default=10_000)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
