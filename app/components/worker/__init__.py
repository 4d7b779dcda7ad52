"""The worker layer. Application code imports from here, never from an engine."""

from app.components.scheduler.schedule import Schedule
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
from app.core.errors import (
    AppError,
    DuplicateJob,
    EngineMismatch,
    InvalidOption,
    JobFailed,
    JobNotFound,
    PayloadError,
    RedisUnavailable,
    ResultTimeout,
    UnknownQueue,
    UnknownTask,
)

__all__ = [
    "AppError", "DuplicateJob", "EngineMismatch", "InvalidOption", "Job", "JobContext", "JobFailed", "JobNotFound",
    "JobRequest", "Middleware", "PayloadError", "PermanentError", "RedisUnavailable", "ResultTimeout", "Retry",
    "Schedule", "SkipJob", "SyncJob", "SyncWorkerClient", "UnknownQueue", "UnknownTask", "WorkerClient", "WorkerContext",
    "current_job", "enqueue", "enqueue_sync", "task",
]
