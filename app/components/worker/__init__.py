"""The worker layer. Application code imports from here, never from an engine."""

from app.components.worker.api import (
    Job,
    JobRequest,
    SyncJob,
    SyncWorkerClient,
    WorkerClient,
    enqueue,
    enqueue_sync,
)
from app.components.worker.middleware import Middleware, SkipJob
from app.components.worker.runtime.context import JobContext, WorkerContext, current_job
from app.components.worker.task import PermanentError, Retry, task

__all__ = [
    "Job", "JobContext", "JobRequest", "Middleware", "PermanentError", "Retry", "SkipJob", "SyncJob", "SyncWorkerClient",
    "WorkerClient", "WorkerContext", "current_job", "enqueue", "enqueue_sync", "task",
]
