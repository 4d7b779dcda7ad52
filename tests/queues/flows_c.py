"""The workflow tests' tasks (flows.py) on queue ``flows_c``: a run that mixes engines."""

from tests.queues.flows import FUNCTIONS


class WorkerSettings:
    functions = FUNCTIONS
    queue_name = "flows_c"
    max_jobs = 20
    max_tries = 3
    job_timeout = 60
