"""The workflow tests' tasks (flows.py) on queue ``flows_k``: the SIGKILL test has it to itself."""

from tests.queues.flows import FUNCTIONS


class WorkerSettings:
    functions = FUNCTIONS
    queue_name = "flows_k"
    max_jobs = 20
    max_tries = 3
    job_timeout = 60
