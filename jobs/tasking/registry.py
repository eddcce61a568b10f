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


ConcurrencyKey = str | Callable[[dict[str, Any]], "str | None"]


@dataclass(frozen=True)
class TaskOptions:
    time_limit: float | Callable[[], float] | None = None
    on_time_limit: Callable[..., Any] | None = None
    rate_limits: tuple[RateLimit, ...] = ()
    result_ttl: int | None = None  # seconds; None means settings.JOBS_RESULT_TTL_SECONDS
    max_snoozes: int = DEFAULT_MAX_SNOOZES
    concurrency: int | None = None  # at most this many of a key running at once
    concurrency_key: ConcurrencyKey | None = None  # None: the task's own name
    task_name: str = ""

    def concurrency_slot(self, kwargs: dict[str, Any], *, owner_id: int | None) -> tuple[str | None, int | None]:
        """The job's concurrency key and limit, computed when it is deferred; (None, None) when
        the task has no limit or its key function returns None for these arguments.

        The key's format fields (or the function's one argument, a dict) are the task's keyword
        arguments and `owner_id`, the user the job is deferred for (unless a kwarg has that name).
        A format field the job does not have is a ValueError: a typo must not lift the limit."""
        if self.concurrency is None:
            return None, None
        if self.concurrency_key is None:
            return f"task:{self.task_name}", self.concurrency
        values = {"owner_id": owner_id, **kwargs}
        if callable(self.concurrency_key):
            key = self.concurrency_key(values)
        else:
            try:
                key = self.concurrency_key.format_map(values)
            except (KeyError, IndexError) as exc:
                raise ValueError(
                    f"{self.task_name}: concurrency_key {self.concurrency_key!r} needs {exc} (a task kwarg or owner_id)"
                ) from None
        return (None, None) if key is None else (str(key), self.concurrency)

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
    concurrency: int | None = None,
    concurrency_key: ConcurrencyKey | None = None,
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
    - `concurrency`: at most this many jobs of one key running at once, across every worker;
      the others wait `todo` (no attempt spent) and are claimed as soon as a slot frees.
      `concurrency_key`: a format string over the job's kwargs and `owner_id`
      (`"llm:user:{owner_id}"`), or a function of them returning the key (None: not limited);
      without it the key is the task (at most `concurrency` jobs of the task). Jobs of other
      tasks with the same key share its slots. Applied by `job_defer` / `job_defer_bulk`.
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
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)):
        raise ValueError(f"{name}: concurrency is a number of jobs")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"{name}: concurrency must be at least 1")
    if concurrency_key is not None and concurrency is None:
        raise ValueError(f"{name}: concurrency_key goes with concurrency")
    if concurrency is not None and cron is not None:
        # Procrastinate's periodic deferrer inserts these jobs, without our columns.
        raise ValueError(
            f"{name}: a periodic task takes no concurrency limit: one job per tick (use lock= against overlaps)"
        )

    def decorator(func: Callable[..., Any]) -> Any:
        _OPTIONS[name] = TaskOptions(
            time_limit=time_limit,
            on_time_limit=on_time_limit,
            rate_limits=tuple(rate_limits),
            result_ttl=result_ttl,
            max_snoozes=max_snoozes,
            concurrency=concurrency,
            concurrency_key=concurrency_key,
            task_name=name,
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
