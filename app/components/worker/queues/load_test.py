"""The ``load_test`` queue: what `app loadtest` and bench/ drive."""

from app.components.worker.tasks.load_test import (
    cpu_intensive_task,
    failure_testing_task,
    io_simulation_task,
    memory_operations_task,
    noop,
)


class WorkerSettings:
    functions = [noop, cpu_intensive_task, io_simulation_task, memory_operations_task, failure_testing_task]
    queue_name = "load_test"
    max_jobs = 50
    job_timeout = 60
    max_tries = 3
    keep_result = 600
