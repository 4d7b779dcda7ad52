"""The ``system`` queue: housekeeping."""

from app.components.worker.tasks.system import cleanup_temp_files, system_health_check


class WorkerSettings:
    functions = [system_health_check, cleanup_temp_files]
    queue_name = "system"
    max_jobs = 10
    job_timeout = 300
    max_tries = 3
    keep_result = 3600
