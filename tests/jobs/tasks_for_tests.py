"""Tasks that exist only for the job-layer tests.

The tests import this module, which registers the tasks with the Procrastinate app. Worker
processes they start import it through `PROCRASTINATE_IMPORT_PATHS` (see `WORKER_ENV`), a
setting read from the environment that production never sets, so these tasks never exist in
a real deployment. Tests and tasks talk across processes through files (`path` arguments) and
the database.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from procrastinate import JobContext

from core.errors import ProviderError
from jobs.tasking import queues
from jobs.tasking.progress import job_progress, job_progress_async
from jobs.tasking.registry import RateLimit, job_task
from jobs.tasking.snooze import JobSnooze
from jobs.tasking.workflows import job_parent_results

WORKER_ENV = {"PROCRASTINATE_IMPORT_PATHS": __name__}

# Two queues the tests pause and run independently (real queue names: queue_pause checks them).
QUEUE_A = queues.IMPORTS
QUEUE_B = queues.NOTIFICATIONS


def wait_for_file(path: str, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


@job_task(name="tests.progress_then_wait", queue=QUEUE_A, pass_context=True)
def progress_then_wait(context: JobContext, *, release_path: str, total: int) -> dict:
    job_progress(context, processed=3, total=total, stage="halfway")
    wait_for_file(release_path)
    job_progress(context, processed=total, total=total, stage="done")
    return {"imported": total}


@job_task(name="tests.echo", queue=QUEUE_A, result_ttl=60)
def echo(*, value: object) -> dict:
    return {"echo": value}


@job_task(name="tests.fail_permanently", queue=QUEUE_A, retries=3)
def fail_permanently(*, reason: str) -> None:
    raise ProviderError(reason, permanent=True)


@job_task(name="tests.fail_transiently", queue=QUEUE_A, retries=2, retry_base_seconds=10)
def fail_transiently(*, reason: str) -> None:
    raise ProviderError(reason, permanent=False)


@job_task(name="tests.stamp_a", queue=QUEUE_A, pass_context=True)
def stamp_a(context: JobContext, *, n: int = 0, sleep: float = 0) -> None:
    """Records when it ran (progress_at, the database's clock), then takes `sleep` seconds."""
    job_progress(context, processed=n)
    time.sleep(sleep)


@job_task(name="tests.stamp_b", queue=QUEUE_B, pass_context=True)
def stamp_b(context: JobContext, *, n: int = 0, sleep: float = 0) -> None:
    job_progress(context, processed=n)
    time.sleep(sleep)


@job_task(
    name="tests.limited_global",
    queue=QUEUE_A,
    pass_context=True,
    rate_limits=[RateLimit(rate=10, per=1, burst=1)],
)
def limited_global(context: JobContext, *, n: int, sleep: float = 0) -> None:
    job_progress(context, processed=n)
    time.sleep(sleep)


@job_task(
    name="tests.limited_per_user",
    queue=QUEUE_A,
    pass_context=True,
    rate_limits=[RateLimit(rate=4, per=1, burst=1, key="user_id")],
)
def limited_per_user(context: JobContext, *, user_id: int, n: int) -> None:
    job_progress(context, processed=n)


@job_task(
    name="tests.limited_per_owner",
    queue=QUEUE_A,
    rate_limits=[RateLimit(rate=1, per=60, burst=1, key="owner")],
)
def limited_per_owner(*, n: int) -> int:
    return n


@job_task(
    name="tests.over_time",
    queue=QUEUE_A,
    pass_context=True,
    time_limit=0.5,
    retries=1,
    retry_base_seconds=1,
)
def over_time(context: JobContext, *, seconds: float, late_path: str) -> None:
    time.sleep(seconds)
    # Runs only if nobody stops the thread: the time limit gives up on it, it cannot kill it.
    Path(late_path).write_text(str(context.job.id))


@job_task(name="tests.wait_then_finish", queue=QUEUE_A, pass_context=True)
def wait_then_finish(context: JobContext, *, go_path: str) -> str:
    job_progress(context, processed=0, stage="waiting")
    wait_for_file(go_path)
    time.sleep(0.2)
    return "finished"


@job_task(name="tests.long_cooperative", queue=QUEUE_A, pass_context=True)
def long_cooperative(context: JobContext, *, seconds: float) -> str:
    """Reports progress every 0.1 s; job_progress raises JobAborted when the worker asks it to stop."""
    started = time.monotonic()
    step = 0
    while time.monotonic() - started < seconds:
        job_progress(context, processed=step)
        step += 1
        time.sleep(0.1)
    return "ran to the end"


@job_task(name="tests.long_stubborn", queue=QUEUE_A, pass_context=True)
def long_stubborn(context: JobContext, *, seconds: float, done_path: str) -> str:
    """Never looks at its context after its first report: nothing can stop it early."""
    job_progress(context, processed=0)
    time.sleep(seconds)
    Path(done_path).write_text("done")
    return "ran to the end"


@job_task(name="tests.long_async", queue=QUEUE_A, pass_context=True)
async def long_async(context: JobContext, *, seconds: float) -> str:
    await job_progress_async(context, processed=0, stage="async")
    await asyncio.sleep(seconds)
    return "ran to the end"


@job_task(name="tests.run_per_attempt", queue=QUEUE_A, pass_context=True)
def run_per_attempt(context: JobContext, *, dir_path: str) -> dict:
    """Says which run it is (its attempt number), in a file as it starts and in its result, and
    waits for `release-<run>` before it ends: a test lets each run end when it wants."""
    run = context.job.attempts
    Path(dir_path, f"started-{run}").write_text(str(context.worker_name))
    wait_for_file(str(Path(dir_path, f"release-{run}")), timeout=120)
    Path(dir_path, f"finished-{run}").write_text("")
    return {"run": run}


@job_task(name="tests.parent_results", queue=QUEUE_A, pass_context=True, result_ttl=60)
def parent_results(context: JobContext) -> dict:
    """Returns what it read of its parents' results (keys are strings once stored as JSON)."""
    return {str(parent): result for parent, result in job_parent_results(context).items()}


@job_task(name="tests.fail_unless_file", queue=QUEUE_A)
def fail_unless_file(*, path: str) -> str:
    """Fails for good until `path` exists (an operator's retry then succeeds)."""
    if not Path(path).exists():
        raise ProviderError(f"{path} is missing", permanent=True)
    return "ok"


@job_task(name="tests.wait_for_release", queue=QUEUE_A)
def wait_for_release(*, release_path: str, n: int = 0) -> int:
    wait_for_file(release_path, timeout=60)
    return n


@job_task(name="tests.batch_report", queue=QUEUE_B, result_ttl=600)
def batch_report(**counts: object) -> dict:
    """A batch's callback: returns the arguments it was given."""
    return counts


# Made periodic by tests/jobs/test_periodic_timezone.py for the length of a test only.
@job_task(name="tests.periodic_stamp", queue=QUEUE_A)
def periodic_stamp(timestamp: int) -> dict:
    return {"timestamp": timestamp}


# Periodic in the worker processes of tests/jobs/test_many_hosts.py only, which set this variable.
if os.environ.get("TESTS_HOSTS_PERIODIC_CRON"):

    @job_task(
        name="tests.periodic_hosts", queue=QUEUE_A, cron=os.environ["TESTS_HOSTS_PERIODIC_CRON"], periodic_id="hosts"
    )
    def periodic_hosts(timestamp: int) -> dict:
        return {"timestamp": timestamp}


@job_task(name="tests.snooze_once", queue=QUEUE_A, retries=2)
def snooze_once(*, marker: str, seconds: float, release_path: str = "") -> str:
    """Snoozes on its first run (after `release_path` appears, when given), succeeds on the next."""
    if release_path:
        wait_for_file(release_path)
    if not Path(marker).exists():
        Path(marker).write_text("snoozed")
        raise JobSnooze(seconds=seconds)
    return "done"


@job_task(name="tests.snooze_forever", queue=QUEUE_A, max_snoozes=2)
def snooze_forever(*, seconds: float) -> None:
    raise JobSnooze(seconds=seconds)


CONCURRENCY = 2  # tests.limited_slots: at most this many of one group running at once


def _running_now(context: JobContext, key: str) -> None:
    """Records, as the job's progress, how many jobs of `key` the database says run right now
    (its own included): read after the claim committed, so it counts every committed claim."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing' AND jobs_concurrency_key = %s", [key]
        )
        running = cursor.fetchone()[0]
    job_progress(context, processed=running, worker=context.job.worker_id)


@job_task(name="tests.limited_slots", queue=QUEUE_A, pass_context=True, concurrency=CONCURRENCY,
          concurrency_key="group:{group}")  # fmt: skip
def limited_slots(context: JobContext, *, group: str, sleep: float = 0.0, release_path: str = "") -> None:
    _running_now(context, f"group:{group}")
    if release_path:
        wait_for_file(release_path, timeout=60)
    time.sleep(sleep)


@job_task(name="tests.limited_task", queue=QUEUE_A, pass_context=True, concurrency=1)
def limited_task(context: JobContext, *, sleep: float = 0.0) -> None:
    """At most one at a time of the whole task (no key: the task's name)."""
    _running_now(context, "task:tests.limited_task")
    time.sleep(sleep)


@job_task(name="tests.limited_flaky", queue=QUEUE_A, pass_context=True, concurrency=1, retries=2,
          retry_base_seconds=1, concurrency_key=lambda kwargs: f"flaky:{kwargs['group']}")  # fmt: skip
def limited_flaky(context: JobContext, *, group: str, fail_path: str) -> None:
    """Fails transiently while `fail_path` does not exist yet... once: it creates it, so the retry succeeds."""
    _running_now(context, f"flaky:{group}")
    if not Path(fail_path).exists():
        Path(fail_path).write_text("failed once")
        raise ProviderError("transient, once", permanent=False)


@job_task(name="tests.stream_server.later", queue=queues.IMPORTS)
def later() -> None:
    """Never runs here: its job is scheduled for next year, so its streams stay open."""


@job_task(name="tests.event_loop_module", queue=QUEUE_A, result_ttl=60)
async def event_loop_module() -> dict:
    """The module of the event loop the worker runs its async jobs on."""
    return {"loop": type(asyncio.get_running_loop()).__module__}


@job_task(name="tests.returns_nan", queue=QUEUE_A, result_ttl=60)
def returns_nan() -> dict:
    """A result Python's json writes but PostgreSQL's jsonb refuses."""
    return {"ratio": float("nan")}


@job_task(name="tests.fails_once", queue=QUEUE_A, pass_context=True, retries=1, retry_base_seconds=0)
def fails_once(context: JobContext) -> str:
    """Fails its first attempt (retried at once), succeeds the next."""
    if context.job.attempts == 0:
        raise ProviderError("first attempt fails", permanent=False)
    return "second attempt"
