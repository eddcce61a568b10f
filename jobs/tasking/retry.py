"""Retry only what is transient.

Providers raise errors carrying `permanent: bool`. A permanent error ends the job at once;
a transient one is retried with exponential backoff until the attempts run out. Two cases
never spend an attempt: a job postponed by a rate limit (`Postponed`) runs again when its
token is due, and a job aborted because its worker shut down runs again at once.
"""

from __future__ import annotations

from datetime import datetime

from procrastinate import JobContext, RetryStrategy
from procrastinate.exceptions import JobAborted
from procrastinate.job_context import AbortReason
from procrastinate.jobs import Job
from procrastinate.retry import RetryDecision


class Postponed(Exception):
    """Raised by the job layer when a job must wait (a rate limit): it runs again at `retry_at`."""

    permanent = False

    def __init__(self, message: str, *, retry_at: datetime) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class TransientErrorRetry(RetryStrategy):
    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if getattr(exception, "permanent", False):
            return None
        return super().get_retry_decision(exception=exception, job=job)


class JobRetryStrategy(TransientErrorRetry):
    """The strategy of every `job_task`: transient errors with backoff, plus postpone and shutdown."""

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if isinstance(exception, Postponed):
            return RetryDecision(retry_at=exception.retry_at)
        if isinstance(exception, JobAborted):
            # The worker only asks about an abort when it was its own shutdown: run it again.
            return RetryDecision(retry_in={"seconds": 0})
        if self.max_attempts == 0:
            return None
        return super().get_retry_decision(exception=exception, job=job)


def will_retry(context: JobContext, exception: BaseException) -> bool:
    """True when the running job's retry strategy will schedule another attempt."""
    task = context.task
    strategy = task.retry_strategy if task else None
    if strategy is None or context.job is None:
        return False
    if isinstance(exception, JobAborted) and context.abort_reason() != AbortReason.SHUTDOWN:
        return False  # the worker retries an aborted job only when the abort was its own shutdown
    return strategy.get_retry_decision(exception=exception, job=context.job) is not None
