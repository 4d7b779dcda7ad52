"""Queue ``bench_limited``: a no-op under a rate limit far above what one Redis carries, so
the bench measures what the rate-limit check costs, not the limit."""

from app.components.worker import task


@task(rate_limit="10000000/s")
async def noop_limited() -> None:
    return None


class WorkerSettings:
    functions = [noop_limited]
    queue_name = "bench_limited"
