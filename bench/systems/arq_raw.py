"""arq used directly, as its README shows: ``Worker(functions=...)``, defaults unless stated."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from bench import probe
from bench.systems import PY, AsyncProducer, System


async def noop(ctx: dict[str, Any]) -> None:
    probe.job_start()
    probe.job_end()


async def sleep(ctx: dict[str, Any]) -> None:
    probe.job_start()
    await asyncio.sleep(0.01)
    probe.job_end()


async def stamp(ctx: dict[str, Any]) -> None:
    probe.stamp()


class ArqRaw(System):
    def __init__(self, poll_delay: float | None) -> None:
        suffix = "defaults" if poll_delay is None else f"poll_delay={poll_delay:g}"
        super().__init__(key="arq-raw" if poll_delay is None else "arq-raw-poll", label=f"arq raw ({suffix})",
                         family="raw", engine="arq", bulk_api="asyncio.gather of enqueue_job (no bulk API)")
        self.poll_delay = poll_delay

    def worker_argv(self, url: str, concurrency: int, task: str) -> list[str]:
        argv = [PY, "-m", "bench.systems.arq_raw", "--url", url, "--concurrency", str(concurrency)]
        return argv + (["--poll-delay", str(self.poll_delay)] if self.poll_delay is not None else [])

    def producer(self, url: str) -> ArqProducer:
        return ArqProducer(url)


class ArqProducer(AsyncProducer):
    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__()

    async def setup(self) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        self.pool = await create_pool(RedisSettings.from_dsn(self.url))

    async def teardown(self) -> None:
        await self.pool.aclose()

    def enqueue_fn(self, task: str) -> Callable[[], Awaitable[Any]]:
        return lambda: self.pool.enqueue_job(task)


def main() -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker

    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("BENCH_REDIS_URL"))
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--poll-delay", type=float, default=None)
    args = parser.parse_args()
    options: dict[str, Any] = {"max_jobs": args.concurrency}
    if args.poll_delay is not None:
        options["poll_delay"] = args.poll_delay
    Worker(functions=[noop, sleep, stamp], redis_settings=RedisSettings.from_dsn(args.url), **options).run()


if __name__ == "__main__":
    main()
