"""Queue ``bench``: the pickup-latency probe and a no-op counted by the probe (``bench/scale.py``:
the same count and timing as the raw engines' no-op), run through the layer like any task."""

from bench import probe


async def stamp() -> None:
    probe.stamp()


async def noop() -> None:
    probe.job_start()
    probe.job_end()


class WorkerSettings:
    functions = [stamp, noop]
    queue_name = "bench"
    max_jobs = 10
