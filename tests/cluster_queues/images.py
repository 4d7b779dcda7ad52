"""Queue `images` of the Redis Cluster tests (see __init__.py)."""

from tests.queues.contract import add, always_fails, flaky, wait_for_file, whoami


class WorkerSettings:
    functions = [add, always_fails, flaky, wait_for_file, whoami]
    queue_name = "images"
    max_jobs = 4
    job_timeout = 30
    max_tries = 2
    keep_result = 120
