"""`job_task`: how every app declares a task, with what the job layer adds to Procrastinate.

    @job_task(name="notes.enrich", queue=queues.ENRICHMENT, retries=3, time_limit=60,
              rate_limits=[RateLimit(rate=100, per=60), RateLimit(rate=10, per=60, key="owner")])
    def note_enrich(context, *, note_id: int): ...

    @job_task(name="jobs.purge", queue=queues.MAINTENANCE, cron="0 3 * * *", periodic_id="purge")
    def purge_finished_jobs(timestamp: int) -> dict[str, int]: ...

    @job_task(name="digests.weekly_fanout", ..., cron="0 2 * * FRI", timezone="Europe/Paris", periodic_id=...)

Every task of the project is declared this way, periodic ones included. The options live in a
registry keyed by task name; the worker middleware (`jobs.engine.middleware`) reads them for every
job it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procrastinate.contrib.django import app

from jobs.tasking.cron import CronSchedule
from jobs.tasking.retry import JobRetryStrategy
from jobs.tasking.snooze import DEFAULT_MAX_SNOOZES


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
    time_limit: float | Callable[[], float] | None = None
    on_time_limit: Callable[..., Any] | None = None
    rate_limits: tuple[RateLimit, ...] = ()
    result_ttl: int | None = None  # seconds; None means settings.JOBS_RESULT_TTL_SECONDS
    max_snoozes: int = DEFAULT_MAX_SNOOZES

    def time_limit_seconds(self) -> float | None:
        """The time limit of a job starting now (a callable is read at every start)."""
        return self.time_limit() if callable(self.time_limit) else self.time_limit


_OPTIONS: dict[str, TaskOptions] = {}
_DEFAULT = TaskOptions()
# (task name, periodic_id) -> its schedule: the key of Procrastinate's periodic registry.
_SCHEDULES: dict[tuple[str, str], CronSchedule] = {}


def task_options(task_name: str) -> TaskOptions:
    return _OPTIONS.get(task_name, _DEFAULT)


def periodic_schedule(task_name: str, periodic_id: str, cron: str) -> CronSchedule:
    """The schedule of a periodic task; one registered without `job_task` (Procrastinate's own
    `app.periodic`) reads its cron in UTC, as Procrastinate does."""
    schedule = _SCHEDULES.get((task_name, periodic_id))
    return schedule if schedule is not None and schedule.cron == cron else CronSchedule(cron)


def job_task(
    *,
    name: str,
    queue: str,
    retries: int = 0,
    retry_base_seconds: int = 2,
    time_limit: float | Callable[[], float] | None = None,
    on_time_limit: Callable[..., Any] | None = None,
    rate_limits: list[RateLimit] | tuple[RateLimit, ...] = (),
    result_ttl: int | None = None,
    max_snoozes: int = DEFAULT_MAX_SNOOZES,
    pass_context: bool = False,
    cron: str | None = None,
    timezone: str = "UTC",
    periodic_id: str = "",
    **procrastinate_options: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """Register a Procrastinate task with retries (transient errors only, exponential backoff:
    base, base**2, ... seconds), an optional time limit, rate limits and result retention.

    - `time_limit`: seconds, or a function returning them (read when each job starts, e.g. from
      settings). Past it the job fails with `TimeLimitExceeded`, a transient error.
    - `on_time_limit`: when the last attempt reaches the time limit, called instead of failing,
      in a thread, with the task's keyword arguments and `error=`; its return value is the job's
      result (the weekly digest writes its plain digest).
    - `max_snoozes`: how many times one job may `raise JobSnooze(seconds=...)`; past it the job
      fails (jobs/tasking/snooze.py).
    - `cron` with `periodic_id`: also a periodic task (Procrastinate's `app.periodic`). The task
      then takes a `timestamp` argument; the id is stored in `procrastinate_periodic_defers`.
    - `timezone`: the IANA zone whose wall clock `cron` reads (default UTC). Times that a DST
      change skips or repeats run once, or follow the clock for `*` schedules (jobs/tasking/cron.py).
      A bad cron or an unknown zone is a ValueError naming the task, at import.
    """
    if cron is None and (periodic_id or timezone != "UTC"):
        raise ValueError(f"{name}: periodic_id and timezone go with cron")
    if max_snoozes < 0:
        raise ValueError(f"{name}: max_snoozes must be 0 or more")
    schedule = None
    if cron is not None:
        try:
            schedule = CronSchedule(cron, timezone)
        except ValueError as exc:
            raise ValueError(f"task {name}: {exc}") from None

    def decorator(func: Callable[..., Any]) -> Any:
        _OPTIONS[name] = TaskOptions(
            time_limit=time_limit,
            on_time_limit=on_time_limit,
            rate_limits=tuple(rate_limits),
            result_ttl=result_ttl,
            max_snoozes=max_snoozes,
        )
        task = app.task(
            name=name,
            queue=queue,
            retry=JobRetryStrategy(max_attempts=retries, exponential_wait=retry_base_seconds),
            pass_context=pass_context,
            **procrastinate_options,
        )(func)
        if schedule is not None:
            _SCHEDULES[(name, periodic_id)] = schedule
            task = app.periodic(cron=schedule.cron, periodic_id=periodic_id)(task)
        return task

    return decorator
