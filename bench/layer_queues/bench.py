"""Queue ``bench``: the pickup-latency probe, run through the layer like any task."""

from bench import probe


async def stamp() -> None:
    probe.stamp()


class WorkerSettings:
    functions = [stamp]
    queue_name = "bench"
    max_jobs = 10
