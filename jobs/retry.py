"""Retry only what is transient.

Providers raise errors carrying `permanent: bool`. A permanent error ends the job at once;
a transient one is retried with exponential backoff until the attempts run out.
"""

from __future__ import annotations

from procrastinate import JobContext, RetryStrategy
from procrastinate.jobs import Job
from procrastinate.retry import RetryDecision


class TransientErrorRetry(RetryStrategy):
    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if getattr(exception, "permanent", False):
            return None
        return super().get_retry_decision(exception=exception, job=job)


def backoff(*, retries: int, base_seconds: int = 2) -> TransientErrorRetry:
    """`retries` further attempts after the first, waiting base, base**2, base**3... seconds."""
    return TransientErrorRetry(max_attempts=retries, exponential_wait=base_seconds)


def will_retry(context: JobContext, exception: BaseException) -> bool:
    """True when the running job's retry strategy will schedule another attempt."""
    task = context.task
    strategy = task.retry_strategy if task else None
    if strategy is None or context.job is None:
        return False
    return strategy.get_retry_decision(exception=exception, job=context.job) is not None
