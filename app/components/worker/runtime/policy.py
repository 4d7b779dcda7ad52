"""Attempt and retry policy: whether a failed attempt is retried, and after how long."""

from __future__ import annotations

import random
from dataclasses import dataclass

from app.components.worker.task import PermanentError, Retry


class JobTimeout(Exception):
    """The job ran past its timeout."""


class WorkerLost(Exception):
    """The worker running the job died (crash redelivery)."""


class NonRetryable(Exception):
    """A failure the layer knows another attempt cannot fix (unknown task, bad arguments)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_tries: int
    backoff: float
    backoff_max: float

    def should_retry(self, attempt: int, exc: BaseException) -> bool:
        if isinstance(exc, (PermanentError, NonRetryable)):
            return False
        return attempt < self.max_tries

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Exponential backoff with full jitter in [base*2^(n-1)/2, base*2^(n-1)], capped."""
        if isinstance(exc, Retry) and exc.delay is not None:
            return exc.delay
        ceiling = min(self.backoff_max, self.backoff * (2 ** (attempt - 1)))
        return ceiling * (0.5 + random.random() / 2)


def describe_error(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)
