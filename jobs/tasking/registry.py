"""`job_task`: how every app declares a task, with what the job layer adds to Procrastinate.

    @job_task(name="notes.enrich", queue=queues.ENRICHMENT, retries=3, time_limit=60,
              rate_limits=[RateLimit(rate=100, per=60), RateLimit(rate=10, per=60, key="owner")])
    def note_enrich(context, *, note_id: int): ...

The options live in a registry keyed by task name; the worker middleware (`jobs.engine.middleware`)
reads them for every job it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procrastinate.contrib.django import app

from jobs.tasking.retry import JobRetryStrategy


@dataclass(frozen=True)
class RateLimit:
    """At most `rate` jobs per `per` seconds, shared by every worker (a token bucket in PostgreSQL).

    `key` makes it a limit per key: the name of a task argument (e.g. "user_id"), or "owner" for
    the user the job was deferred for. Without `key` it is one limit for the whole task, or for
    the whole queue with `scope="queue"`.
    """

    rate: float
    per: float = 1.0
    key: str | None = None
    scope: str = "task"  # or "queue"
    burst: float | None = None

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.per <= 0:
            raise ValueError("a rate limit needs a positive rate and period")
        if self.scope not in ("task", "queue"):
            raise ValueError("scope is 'task' or 'queue'")

    @property
    def per_second(self) -> float:
        return self.rate / self.per

    def bucket(self, *, task_name: str, queue: str, kwargs: dict[str, Any], owner_id: int | None) -> str | None:
        """The bucket's key for one job; None when the job has no value for `key` (not limited)."""
        base = f"queue:{queue}" if self.scope == "queue" else f"task:{task_name}"
        if self.key is None:
            return base
        value = owner_id if self.key == "owner" else kwargs.get(self.key)
        return None if value is None else f"{base}:{self.key}={value}"


@dataclass(frozen=True)
class TaskOptions:
    time_limit: float | None = None
    rate_limits: tuple[RateLimit, ...] = ()
    result_ttl: int | None = None  # seconds; None means settings.JOBS_RESULT_TTL_SECONDS


_OPTIONS: dict[str, TaskOptions] = {}
_DEFAULT = TaskOptions()


def task_options(task_name: str) -> TaskOptions:
    return _OPTIONS.get(task_name, _DEFAULT)


def job_task(
    *,
    name: str,
    queue: str,
    retries: int = 0,
    retry_base_seconds: int = 2,
    time_limit: float | None = None,
    rate_limits: list[RateLimit] | tuple[RateLimit, ...] = (),
    result_ttl: int | None = None,
    pass_context: bool = False,
    **procrastinate_options: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """Register a Procrastinate task with retries (transient errors only, exponential backoff:
    base, base**2, ... seconds), an optional time limit, rate limits and result retention."""

    def decorator(func: Callable[..., Any]) -> Any:
        _OPTIONS[name] = TaskOptions(time_limit=time_limit, rate_limits=tuple(rate_limits), result_ttl=result_ttl)
        return app.task(
            name=name,
            queue=queue,
            retry=JobRetryStrategy(max_attempts=retries, exponential_wait=retry_base_seconds),
            pass_context=pass_context,
            **procrastinate_options,
        )(func)

    return decorator
