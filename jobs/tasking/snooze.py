"""Snooze: a task asks to run again later without spending an attempt (Oban's `{:snooze, seconds}`).

    @job_task(name="notes.import", queue=queues.IMPORTS, retries=3, max_snoozes=20)
    def note_import(*, import_id: int) -> None:
        if not upload_ready(import_id):
            raise JobSnooze(seconds=30)
        ...

The job goes back to its queue, due `seconds` later on the database's clock, with the same
attempts, arguments, lock and queueing lock; its timeline shows a `deferred_for_retry` and a
`scheduled` event, and the jobs API its `snoozes`. The worker middleware counts snoozes per job
(jobs_job_info.snoozes) and fails the job, permanently, once a task's `max_snoozes` (default
DEFAULT_MAX_SNOOZES) is passed: a task that snoozes forever ends instead of being claimed again
without end. A snoozed job waiting behind a newer job with its queueing lock is superseded by it
(migration 0005), as a retried one is.
"""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from jobs.tasking.retry import Postponed

MAX_SNOOZE_SECONDS = 7 * 24 * 3600  # later than this is a scheduled job: job_defer(..., schedule_at=)
DEFAULT_MAX_SNOOZES = 100


class JobSnooze(Postponed):
    """Raise it from a task to run the job again in `seconds` (0 < seconds <= MAX_SNOOZE_SECONDS)."""

    def __init__(self, *, seconds: float) -> None:
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise TypeError(f"JobSnooze(seconds=) takes a number of seconds, not {seconds!r}")
        if not 0 < seconds <= MAX_SNOOZE_SECONDS:
            raise ValueError(f"JobSnooze(seconds=) must be more than 0 and at most {MAX_SNOOZE_SECONDS}; got {seconds}")
        super().__init__(f"snoozed for {seconds:g} s", retry_at=timezone.now() + timedelta(seconds=seconds))
        self.seconds = seconds


class SnoozeLimitExceeded(Exception):
    """The job snoozed more times than its task's `max_snoozes`: it fails, and is not retried."""

    permanent = True
