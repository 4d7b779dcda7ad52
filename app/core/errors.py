"""One root exception for everything the layer raises on purpose.

Every message is written for a person: it says what went wrong and what to do.
The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``.
"""


class AppError(Exception):
    """Root of every error the layer raises on purpose."""

    exit_code = 2


class ConfigError(AppError):
    """A setting is missing or invalid."""


class RedisUnavailable(AppError):
    """Redis cannot be reached, or refused the credentials."""


class UnknownQueue(AppError):
    """A queue name that no module in the queues packages declares."""


class UnknownTask(AppError):
    """A task name that no queue declares."""


class PayloadError(AppError):
    """Arguments or a result that cannot travel as JSON, or that are too large."""


class DuplicateJob(AppError):
    """A caller-chosen job id that is already queued or running."""

    exit_code = 1


class EngineMismatch(AppError):
    """The producer's engine for a queue differs from the one its live workers run."""


class JobNotFound(AppError):
    """No job (or no result any more) under that id."""

    exit_code = 1


class ResultTimeout(AppError):
    """A result did not arrive within the time the caller was willing to wait."""

    exit_code = 1


class JobFailed(AppError):
    """The job ended in failure; carries the job's own error type and message."""

    exit_code = 1

    def __init__(self, job_id: str, error_type: str, message: str) -> None:
        self.job_id = job_id
        self.error_type = error_type
        self.message = message
        super().__init__(f"job {job_id} failed: {error_type}: {message}")


class InvalidOption(AppError):
    """An option's value is out of range or of the wrong kind (a delay, a timeout, a job id)."""


class NotReplicated(RedisUnavailable):
    """Jobs the master accepted but fewer replicas than REDIS_WAIT_REPLICAS confirmed in time."""

    def __init__(self, message: str, job_ids: list[str]) -> None:
        super().__init__(message)
        self.job_ids = job_ids
