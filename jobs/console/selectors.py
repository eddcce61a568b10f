"""Reads of the job system's own tables (Procrastinate's), for health, operations, the jobs API
and the dashboard. Plain functions returning querysets or dicts."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import connection
from django.db.models import Case, CharField, F, IntegerField, OuterRef, Q, QuerySet, Subquery, Value, When
from django.db.models.expressions import RawSQL
from django.db.models.functions import Cast, Now
from django.utils import timezone
from procrastinate.contrib.django.models import ProcrastinateEvent, ProcrastinateJob

from jobs.models import CircuitBreaker, JobBatch, JobInfo, PausedQueue
from jobs.tasking import queues


def job_counts_by_queue() -> dict[str, dict[str, int]]:
    """{queue: {status: count}} over every job row."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT queue_name, status, count(*) FROM procrastinate_jobs GROUP BY 1, 2 ORDER BY 1, 2")
        counts: dict[str, dict[str, int]] = defaultdict(dict)
        for queue, job_status, count in cursor.fetchall():
            counts[queue][job_status] = count
    return dict(counts)


def live_worker_exists(*, stalled_after_seconds: float) -> bool:
    """Whether any worker's heartbeat is recent: one probe of the heartbeat index, whatever
    the number of workers or jobs (the anonymous health check)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT FROM procrastinate_workers"
            " WHERE last_heartbeat >= now() - make_interval(secs => %s))",
            [stalled_after_seconds],
        )
        return cursor.fetchone()[0]


def worker_heartbeat_age(*, worker_id: int) -> float | None:
    """Seconds since the worker's last heartbeat, on the database's clock; None when its row is
    gone (it stopped, or another worker pruned it as stalled)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT extract(epoch FROM now() - last_heartbeat)::float FROM procrastinate_workers WHERE id = %s",
            [worker_id],
        )
        row = cursor.fetchone()
    return None if row is None else row[0]


def live_workers(*, stalled_after_seconds: float) -> list[dict]:
    """Workers whose last heartbeat is recent enough to count them alive, and how many jobs
    each is running."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT worker.id, worker.jobs_host, worker.last_heartbeat,"
            "       (SELECT count(*) FROM procrastinate_jobs AS job"
            "         WHERE job.worker_id = worker.id AND job.status = 'doing')"
            "  FROM procrastinate_workers AS worker"
            " WHERE worker.last_heartbeat >= now() - make_interval(secs => %s)"
            " ORDER BY worker.id",
            [stalled_after_seconds],
        )
        return [
            {"id": wid, "host": host, "last_heartbeat": beat, "running": running}
            for wid, host, beat, running in cursor.fetchall()
        ]


# --- The jobs API: what a user (or staff) may see -------------------------------------------

FINAL_STATUSES = ("succeeded", "failed", "cancelled", "aborted")
# Events after which a job waits in its queue again; `scheduled` records when it becomes due.
_ENQUEUE_EVENTS = ("deferred", "deferred_for_retry", "retried", "scheduled")
# Events that end one run of a job.
_RUN_END_EVENTS = ("deferred_for_retry", "succeeded", "failed", "aborted")


# Columns of ours on procrastinate_jobs (migration 0008) that Procrastinate's model does not know.
def _batch_id() -> RawSQL:
    return RawSQL('"procrastinate_jobs"."jobs_batch_id"', (), output_field=IntegerField())


def _parents_waiting() -> RawSQL:
    return RawSQL('"procrastinate_jobs"."jobs_parents_waiting"', (), output_field=IntegerField())


def job_queryset(*, user: AbstractBaseUser) -> QuerySet[ProcrastinateJob]:
    """Every job `user` may see, annotated for the list: staff see all (with or without an info
    row), everyone else only the jobs deferred for them."""
    jobs = ProcrastinateJob.objects.all()
    if not user.is_staff:
        jobs = jobs.filter(info__owner_id=user.pk)
    deferred_at = ProcrastinateEvent.objects.filter(job_id=OuterRef("id"), type="deferred").order_by("id")
    return jobs.annotate(
        # "scheduled" is a todo job that is not due yet: shown as its own state.
        state=Case(
            When(status="todo", scheduled_at__gt=Now(), then=Value("scheduled")),
            default=Cast("status", CharField()),  # the column is an enum: compare as text
            output_field=CharField(),
        ),
        created_at=Subquery(deferred_at.values("at")[:1]),
        owner_id=F("info__owner_id"),
        processed=F("info__processed"),
        total=F("info__total"),
        progress_at=F("info__progress_at"),
        batch_id=_batch_id(),
        parents_waiting=_parents_waiting(),
    )


def job_filter_state(jobs: QuerySet[ProcrastinateJob], state: str) -> QuerySet[ProcrastinateJob]:
    """A Procrastinate status, or the virtual `scheduled` (todo, not due), `blocked` (todo, some
    parent has not ended) and `waiting` (todo, due and not blocked: a worker may take it)."""
    if state == "scheduled":
        return jobs.filter(status="todo", scheduled_at__gt=Now())
    if state == "blocked":
        return jobs.alias(blocked_by=_parents_waiting()).filter(status="todo", blocked_by__gt=0)
    if state == "waiting":
        return jobs.alias(blocked_by=_parents_waiting()).filter(
            Q(scheduled_at__isnull=True) | Q(scheduled_at__lte=Now()), status="todo", blocked_by=0
        )
    return jobs.filter(status=state)


def job_filter_batch(jobs: QuerySet[ProcrastinateJob], batch_id: int) -> QuerySet[ProcrastinateJob]:
    """The members of a batch (its index, migration 0008)."""
    return jobs.alias(in_batch=_batch_id()).filter(in_batch=batch_id)


def job_progress_summary(*, processed: int | None, total: int | None) -> dict[str, Any] | None:
    if processed is None:
        return None
    percent = round(min(processed / total, 1.0) * 100, 1) if total else None
    return {"processed": processed, "total": total, "percent": percent}


def job_timeline(*, job_id: int) -> list[dict[str, Any]]:
    """The job's events in time order, each with the milliseconds since the previous one.

    A `scheduled` event is stamped with the time the job becomes due (possibly in the future),
    so ordering by time puts it where the job starts to wait."""
    events = ProcrastinateEvent.objects.filter(job_id=job_id).order_by(F("at").asc(nulls_last=True), "id")
    timeline = []
    previous = None
    for event in events.values("type", "at"):
        duration = None
        if previous is not None and event["at"] is not None:
            duration = round((event["at"] - previous).total_seconds() * 1000, 1)
        timeline.append({"type": event["type"], "at": event["at"], "duration_ms": duration})
        previous = event["at"] or previous
    return timeline


def job_timings(*, timeline: list[dict[str, Any]], status: str, now: datetime) -> dict[str, float | None]:
    """Total run time (started -> end of each run; a running job counts up to now) and total wait
    time (due -> started; a due job still waiting counts up to now), in milliseconds."""
    run_ms = wait_ms = 0.0
    started = waiting_since = None
    for event in timeline:
        at, kind = event["at"], event["type"]
        if at is None:
            continue
        if kind == "started":
            if waiting_since is not None:
                wait_ms += max((at - waiting_since).total_seconds(), 0) * 1000
            started, waiting_since = at, None
        elif kind in _RUN_END_EVENTS and started is not None:
            run_ms += (at - started).total_seconds() * 1000
            started = None
        if kind in _ENQUEUE_EVENTS:
            waiting_since = max(at, waiting_since) if waiting_since is not None else at
    if status == "doing" and started is not None:
        run_ms += (now - started).total_seconds() * 1000
    if status == "todo" and waiting_since is not None and waiting_since <= now:
        wait_ms += (now - waiting_since).total_seconds() * 1000
    ran = any(e["type"] == "started" for e in timeline)
    return {
        "run_time_ms": round(run_ms, 1) if ran else None,
        "wait_time_ms": round(wait_ms, 1) if ran or status == "todo" else None,
    }


def job_detail(*, job: ProcrastinateJob) -> dict[str, Any]:
    """Everything the API shows about one job (from `job_queryset`)."""
    info = JobInfo.objects.filter(job_id=job.id).first()
    now = timezone.now()
    timeline = job_timeline(job_id=job.id)
    progress = None
    if info is not None and info.processed is not None:
        progress = {
            **job_progress_summary(processed=info.processed, total=info.total),
            "data": info.progress,
            "updated_at": info.progress_at,
        }
    result_live = info is not None and (info.result_expires_at is None or info.result_expires_at > now)
    return {
        "id": job.id,
        "task": job.task_name,
        "queue": job.queue_name,
        "status": job.state,
        "priority": job.priority,
        "attempts": job.attempts,
        "scheduled_at": job.scheduled_at,
        "created_at": job.created_at,
        "lock": job.lock,
        "queueing_lock": job.queueing_lock,
        "args": job.args,
        "owner_id": info.owner_id if info is not None else None,
        "timeline": timeline,
        **job_timings(timeline=timeline, status=job.status, now=now),
        "progress": progress,
        "result": info.result if result_live else None,
        "result_expires_at": info.result_expires_at if result_live else None,
        "error": (info.error or None) if info is not None else None,
        "snoozes": info.snoozes if info is not None else 0,
        **job_workflow(job_id=job.id),
    }


def queue_list() -> list[dict[str, Any]]:
    """Every known queue (and any other queue that has jobs): counts by status, paused or not."""
    counts = job_counts_by_queue()
    paused = {p.queue_name: p for p in PausedQueue.objects.all()}
    names = list(queues.ALL) + sorted(set(counts) - set(queues.ALL))
    return [queue_state(name=name, counts=counts.get(name, {}), paused=paused.get(name)) for name in names]


def queue_state(*, name: str, counts: dict[str, int] | None = None, paused: PausedQueue | None = None) -> dict:
    if counts is None:
        counts = job_counts_by_queue().get(name, {})
        paused = PausedQueue.objects.filter(queue_name=name).first()
    return {
        "name": name,
        "counts": {s: counts.get(s, 0) for s in ProcrastinateJob.STATUSES},
        "paused": paused is not None,
        "paused_at": paused.paused_at if paused is not None else None,
    }


# --- Metrics --------------------------------------------------------------------------------

# Jobs `owner_id` may see (all with NULL): the CTE every metrics query starts from.
_SCOPE = """
scoped AS (
    SELECT job.id, job.queue_name, job.task_name, job.status, job.scheduled_at
      FROM procrastinate_jobs AS job
     WHERE %(owner_id)s::bigint IS NULL
        OR EXISTS (SELECT 1 FROM jobs_job_info AS info WHERE info.job_id = job.id AND info.owner_id = %(owner_id)s)
)
"""

# Live jobs (todo/doing) and the ones with any event in the window.
_METRICS_COUNTS = f"""
WITH {_SCOPE}
SELECT queue_name, status::text, count(*)
  FROM scoped
 WHERE status IN ('todo', 'doing')
    OR EXISTS (SELECT 1 FROM procrastinate_events AS event
                WHERE event.job_id = scoped.id AND event.at >= %(since)s AND event.at <= now())
 GROUP BY 1, 2
 ORDER BY 1, 2
"""

_METRICS_THROUGHPUT = f"""
WITH {_SCOPE}
SELECT date_trunc('minute', event.at) AS minute,
       count(*) FILTER (WHERE event.type = 'succeeded'),
       count(*) FILTER (WHERE event.type = 'failed')
  FROM procrastinate_events AS event
  JOIN scoped ON scoped.id = event.job_id
 WHERE event.type IN ('succeeded', 'failed') AND event.at >= %(since)s
 GROUP BY 1
 ORDER BY 1
"""

# For each start in the window: the wait since the job became due (its last enqueue event, or
# its scheduled time when later) and, when the run ended in success or failure, its run time.
_METRICS_TASKS = f"""
WITH {_SCOPE},
runs AS (
    SELECT scoped.task_name,
           1000 * extract(epoch FROM started.at - due.at)::float8 AS wait_ms,
           1000 * extract(epoch FROM ended.at - started.at)::float8 AS run_ms,
           ended.type AS outcome
      FROM procrastinate_events AS started
      JOIN scoped ON scoped.id = started.job_id
      CROSS JOIN LATERAL (
          SELECT max(event.at) AS at FROM procrastinate_events AS event
           WHERE event.job_id = started.job_id AND event.id < started.id AND event.at <= started.at
             AND event.type IN ('deferred', 'deferred_for_retry', 'retried', 'scheduled')
      ) AS due
      LEFT JOIN LATERAL (
          SELECT event.type, event.at FROM procrastinate_events AS event
           WHERE event.job_id = started.job_id AND event.id > started.id
             AND event.type IN ('succeeded', 'failed', 'deferred_for_retry', 'aborted')
           ORDER BY event.id
           LIMIT 1
      ) AS ended ON true
     WHERE started.type = 'started' AND started.at >= %(since)s
)
SELECT task_name,
       count(*) FILTER (WHERE outcome IN ('succeeded', 'failed')) AS finished,
       count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE outcome = 'failed') AS failed,
       count(*) AS started,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY wait_ms) AS wait,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY run_ms)
           FILTER (WHERE outcome IN ('succeeded', 'failed')) AS run
  FROM runs
 GROUP BY task_name
 ORDER BY task_name
"""

# The due todo job that has waited longest, counted from when it became due.
_METRICS_OLDEST_WAITING = f"""
WITH {_SCOPE}
SELECT scoped.id, scoped.task_name, scoped.queue_name, due.at,
       1000 * extract(epoch FROM now() - due.at) AS age_ms
  FROM scoped
 CROSS JOIN LATERAL (
     SELECT max(event.at) AS at FROM procrastinate_events AS event
      WHERE event.job_id = scoped.id AND event.at <= now()
        AND event.type IN ('deferred', 'deferred_for_retry', 'retried', 'scheduled')
 ) AS due
 WHERE scoped.status = 'todo' AND (scoped.scheduled_at IS NULL OR scoped.scheduled_at <= now())
 ORDER BY due.at NULLS LAST, scoped.id
 LIMIT 1
"""


def _percentiles(values: list[float] | None) -> dict[str, float | None]:
    values = values or [None, None, None]
    return {name: None if v is None else round(v, 1) for name, v in zip(("p50", "p95", "p99"), values, strict=True)}


def job_metrics(*, hours: int, owner_id: int | None = None) -> dict[str, Any]:
    """Metrics over the last `hours`, for the jobs of `owner_id` (every job when None).

    - `counts`: {queue: {status: n}} for live jobs and jobs with activity in the window;
    - `throughput`: successes and failures finished per minute (minutes without any are left
      out), and the average per minute over the whole window;
    - `tasks`: per task, for runs started in the window: enqueue-to-start and run-time
      percentiles (ms), runs finished, failures and the failure rate;
    - `oldest_waiting`: the due job that has waited longest (id, task, age), or None.
    """
    since = timezone.now() - timedelta(hours=hours)
    params = {"owner_id": owner_id, "since": since}
    with connection.cursor() as cursor:
        cursor.execute(_METRICS_COUNTS, params)
        counts: dict[str, dict[str, int]] = defaultdict(dict)
        for queue, job_status, count in cursor.fetchall():
            counts[queue][job_status] = count

        cursor.execute(_METRICS_THROUGHPUT, params)
        per_minute = [{"minute": m, "succeeded": s, "failed": f} for m, s, f in cursor.fetchall()]

        cursor.execute(_METRICS_TASKS, params)
        tasks = {}
        for task_name, finished, succeeded, failed, started, wait, run in cursor.fetchall():
            tasks[task_name] = {
                "count": finished,
                "started": started,
                "succeeded": succeeded,
                "failed": failed,
                "failure_rate": round(failed / finished, 4) if finished else None,
                "enqueue_to_start_ms": _percentiles(wait),
                "run_time_ms": _percentiles(run),
            }

        cursor.execute(_METRICS_OLDEST_WAITING, params)
        row = cursor.fetchone()
    oldest = None
    if row is not None:
        job_id, task_name, queue, due_at, age_ms = row
        oldest = {
            "id": job_id,
            "task": task_name,
            "queue": queue,
            "due_at": due_at,
            "age_seconds": None if age_ms is None else round(float(age_ms) / 1000, 3),
        }
    minutes = hours * 60
    total_succeeded = sum(m["succeeded"] for m in per_minute)
    total_failed = sum(m["failed"] for m in per_minute)
    return {
        "hours": hours,
        "since": since,
        "counts": dict(counts),
        "throughput": {
            "per_minute": per_minute,
            "succeeded": total_succeeded,
            "failed": total_failed,
            "average_succeeded_per_minute": round(total_succeeded / minutes, 4),
            "average_failed_per_minute": round(total_failed / minutes, 4),
        },
        "tasks": tasks,
        "oldest_waiting": oldest,
    }


# --- The staff dashboard and /metrics (dashboard_*) ------------------------------------------
# Every number is read from PostgreSQL when asked, so every web process shows the same.

# Completions per time bucket, zero-filled: one row per bucket from `span` ago to now. The
# events are counted in one pass, then laid on the buckets.
_DASHBOARD_THROUGHPUT = """
WITH buckets AS (
    SELECT generate_series(
               date_bin(%(step)s::interval, now() - %(span)s::interval, 'epoch'::timestamptz) + %(step)s::interval,
               date_bin(%(step)s::interval, now(), 'epoch'::timestamptz),
               %(step)s::interval
           ) AS start
), counted AS (
    SELECT date_bin(%(step)s::interval, at, 'epoch'::timestamptz) AS start,
           count(*) FILTER (WHERE type = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE type = 'failed') AS failed
      FROM procrastinate_events
     WHERE type IN ('succeeded', 'failed') AND at >= (SELECT min(start) FROM buckets)
     GROUP BY 1
)
SELECT buckets.start, coalesce(counted.succeeded, 0), coalesce(counted.failed, 0)
  FROM buckets
  LEFT JOIN counted USING (start)
 ORDER BY buckets.start
"""


def dashboard_throughput(*, span: str, step: str) -> list[dict]:
    """[{start, succeeded, failed}] per `step` (e.g. '1 minute') over the last `span` ('1 hour').
    Failed counts jobs that failed for good, not attempts that will be retried."""
    with connection.cursor() as cursor:
        cursor.execute(_DASHBOARD_THROUGHPUT, {"span": span, "step": step})
        return [{"start": start, "succeeded": ok, "failed": bad} for start, ok, bad in cursor.fetchall()]


# Run times (started -> succeeded/failed/aborted) of the runs that ended in the window.
_DASHBOARD_RUN_HISTOGRAM = """
WITH runs AS (
    SELECT job.task_name, greatest(extract(epoch FROM ended.at - started.at)::float8, 0) AS seconds
      FROM procrastinate_events AS ended
      JOIN procrastinate_jobs AS job ON job.id = ended.job_id
     CROSS JOIN LATERAL (
         SELECT max(event.at) AS at FROM procrastinate_events AS event
          WHERE event.job_id = ended.job_id AND event.id < ended.id AND event.type = 'started'
     ) AS started
     WHERE ended.type IN ('succeeded', 'failed', 'aborted')
       AND ended.at >= now() - make_interval(secs => %(seconds)s)
       AND started.at IS NOT NULL
)
SELECT task_name,
       array_agg(le_count ORDER BY le) AS bucket_counts,
       min(total) AS total,
       min(total_seconds) AS total_seconds
  FROM (
      SELECT task_name, le,
             count(*) FILTER (WHERE seconds <= le) AS le_count,
             count(*) AS total,
             sum(seconds) AS total_seconds
        FROM runs
       CROSS JOIN unnest(%(buckets)s::float8[]) AS le
       GROUP BY task_name, le
  ) AS per_bucket
 GROUP BY task_name
 ORDER BY task_name
"""


def dashboard_run_histogram(*, seconds: float, buckets: list[float]) -> list[dict]:
    """Per task, the run times of jobs that ended (succeeded, failed, aborted) in the last
    `seconds`: cumulative counts for each upper bound in `buckets` (ascending), count and sum."""
    with connection.cursor() as cursor:
        cursor.execute(_DASHBOARD_RUN_HISTOGRAM, {"seconds": seconds, "buckets": sorted(buckets)})
        return [
            {"task": task, "buckets": list(counts), "count": total, "sum": float(total_seconds)}
            for task, counts, total, total_seconds in cursor.fetchall()
        ]


_DASHBOARD_FAILING = """
WITH failed_now AS (
    SELECT task_name, count(*) AS failed, max(id) AS last_job_id
      FROM procrastinate_jobs WHERE status = 'failed' GROUP BY task_name
), failed_recently AS (
    SELECT job.task_name, count(*) AS failures, max(event.at) AS last_failed_at
      FROM procrastinate_events AS event
      JOIN procrastinate_jobs AS job ON job.id = event.job_id
     WHERE event.type IN ('failed', 'deferred_for_retry')
       AND event.at >= now() - make_interval(secs => %(seconds)s)
     GROUP BY job.task_name
)
SELECT failing.task_name, failing.failed, failing.failures, failing.last_failed_at,
       (SELECT info.error
          FROM jobs_job_info AS info
          JOIN procrastinate_jobs AS job ON job.id = info.job_id
         WHERE job.task_name = failing.task_name AND info.error <> ''
         ORDER BY job.status = 'failed' DESC, job.id DESC
         LIMIT 1) AS last_error
  FROM (
      SELECT task_name, coalesce(failed_now.failed, 0) AS failed, coalesce(failed_recently.failures, 0) AS failures,
             failed_recently.last_failed_at
        FROM failed_now FULL JOIN failed_recently USING (task_name)
  ) AS failing
 ORDER BY failing.failed DESC, failing.failures DESC, failing.task_name
"""


def dashboard_failing_tasks(*, seconds: float) -> list[dict]:
    """Tasks with failed jobs now, or failed attempts (final or retried) in the last `seconds`,
    with the last error message stored for one of their jobs."""
    with connection.cursor() as cursor:
        cursor.execute(_DASHBOARD_FAILING, {"seconds": seconds})
        return [
            {"task": task, "failed": failed, "recent_failures": recent, "last_failed_at": at, "last_error": error}
            for task, failed, recent, at, error in cursor.fetchall()
        ]


def dashboard_running_progress(*, limit: int = 50) -> list[dict]:
    """Running jobs that report progress (imports and other long jobs), oldest first."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT job.id, job.task_name, job.queue_name, info.processed, info.total, info.progress_at"
            "  FROM procrastinate_jobs AS job"
            "  JOIN jobs_job_info AS info ON info.job_id = job.id"
            " WHERE job.status = 'doing' AND (info.processed IS NOT NULL OR info.total IS NOT NULL)"
            " ORDER BY job.id LIMIT %s",
            [limit],
        )
        rows = cursor.fetchall()
    return [
        {
            "job_id": job_id,
            "task": task,
            "queue": queue,
            "processed": processed,
            "total": total,
            "percent": (job_progress_summary(processed=processed, total=total) or {}).get("percent"),
            "progress_at": at,
        }
        for job_id, task, queue, processed, total, at in rows
    ]


def paused_queue_names() -> set[str]:
    return set(PausedQueue.objects.values_list("queue_name", flat=True))


_ATTEMPTS_BY_TASK = (
    "SELECT task_name, count(*), coalesce(sum(attempts), 0) FROM procrastinate_jobs GROUP BY 1 ORDER BY 1"
)


def job_attempts_by_task() -> list[tuple[str, int, int]]:
    """(task, jobs, attempts spent) per task, over the jobs in the queue table."""
    with connection.cursor() as cursor:
        cursor.execute(_ATTEMPTS_BY_TASK)
        return cursor.fetchall()


def circuit_breaker_states() -> dict[str, str]:
    """The state (`closed`, `half_open`, `open`) of every breaker that has failed at least once."""
    return dict(CircuitBreaker.objects.values_list("name", "state"))


# --- Workflows: a job's parents, children and batch; batches --------------------------------

_RELATIVES = """
SELECT 'parent' AS side, d.parent_id AS id, d.state, d.on_parent_failure, job.task_name, job.status::text
  FROM jobs_job_dependencies AS d JOIN procrastinate_jobs AS job ON job.id = d.parent_id
 WHERE d.child_id = %(id)s
UNION ALL
SELECT 'child', d.child_id, d.state, d.on_parent_failure, job.task_name, job.status::text
  FROM jobs_job_dependencies AS d JOIN procrastinate_jobs AS job ON job.id = d.child_id
 WHERE d.parent_id = %(id)s
ORDER BY 1, 2
"""


def job_workflow(*, job_id: int) -> dict[str, Any]:
    """A job's batch, its parents (with the state of each dependency: waiting, succeeded,
    failed) and children, how many parents it still waits for, and its concurrency limit (its
    key, the limit, the key's jobs running now) if its task has one."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT job.jobs_batch_id, job.jobs_parents_waiting, job.jobs_concurrency_key, job.jobs_concurrency_limit,"
            "       (SELECT GREATEST(slot.running, 0) FROM jobs_concurrency_slots AS slot"
            "         WHERE slot.key = job.jobs_concurrency_key)"
            "  FROM procrastinate_jobs AS job WHERE job.id = %s",
            [job_id],
        )
        row = cursor.fetchone()
        cursor.execute(_RELATIVES, {"id": job_id})
        relatives = cursor.fetchall()
    batch_id, waiting, key, cap, running = row if row else (None, 0, None, None, None)
    concurrency = None if key is None else {"key": key, "limit": cap, "running": running or 0}
    parents = [
        {"id": r[1], "task": r[4], "status": r[5], "dependency": r[2], "on_parent_failure": r[3]}
        for r in relatives
        if r[0] == "parent"
    ]
    children = [{"id": r[1], "task": r[4], "status": r[5]} for r in relatives if r[0] == "child"]
    return {
        "batch_id": batch_id,
        "parents_waiting": waiting,
        "parents": parents,
        "children": children,
        "concurrency": concurrency,
    }


def batch_queryset(*, user: AbstractBaseUser) -> QuerySet[JobBatch]:
    """The batches `user` may see: their own (staff: all), newest first."""
    batches = JobBatch.objects.all()
    return batches if user.is_staff else batches.filter(owner_id=user.pk)


BATCH_MEMBERS_SHOWN = 200


def batch_detail(*, batch: JobBatch, members_shown: int = BATCH_MEMBERS_SHOWN) -> dict[str, Any]:
    """A batch's counts and progress, its members by status, the first members and its callbacks."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT status::text, count(*) FROM procrastinate_jobs WHERE jobs_batch_id = %s GROUP BY 1", [batch.id]
        )
        by_status = dict(cursor.fetchall())
        cursor.execute(
            "SELECT id, task_name, status::text FROM procrastinate_jobs WHERE jobs_batch_id = %s ORDER BY id LIMIT %s",
            [batch.id, members_shown],
        )
        members = [{"id": r[0], "task": r[1], "status": r[2]} for r in cursor.fetchall()]
    return {**batch_summary(batch=batch), "members_by_status": by_status, "members": members}


def batch_progress(*, state: str, total: int, succeeded: int, failed: int, cancelled: int) -> dict[str, Any]:
    """A batch's counts and progress (members done / total), as the API and its stream show them."""
    done = succeeded + failed + cancelled
    return {
        "state": state,
        "total": total,
        "done": done,
        "succeeded": succeeded,
        "failed": failed,
        "cancelled": cancelled,
        "percent": round(done / total * 100, 1) if total else (100.0 if state == "done" else None),
    }


def batch_summary(*, batch: JobBatch) -> dict[str, Any]:
    return {
        "id": batch.id,
        "name": batch.name,
        "owner_id": batch.owner_id,
        **batch_progress(
            state=batch.state,
            total=batch.total,
            succeeded=batch.succeeded,
            failed=batch.failed,
            cancelled=batch.cancelled,
        ),
        "callbacks": sorted(batch.callbacks),
        "callback_job_ids": list(batch.callback_job_ids),
        "completions": batch.completions,
        "created_at": batch.created_at,
        "completed_at": batch.completed_at,
    }


def dashboard_batches(*, limit: int = 20) -> list[dict[str, Any]]:
    """Batches not done yet, then the most recently completed, up to `limit`."""
    unfinished = list(JobBatch.objects.exclude(state="done").order_by("id")[:limit])
    recent = list(JobBatch.objects.filter(state="done").order_by("-completed_at", "-id")[: limit - len(unfinished)])
    return [batch_summary(batch=batch) for batch in unfinished + recent]


def dashboard_blocked_jobs(*, limit: int = 50) -> list[dict[str, Any]]:
    """Jobs waiting for their parents, oldest first, with the parents they still wait for."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT job.id, job.task_name, job.queue_name, job.jobs_parents_waiting,"
            "       array_agg(d.parent_id ORDER BY d.parent_id) FILTER (WHERE d.state = 'waiting')"
            "  FROM procrastinate_jobs AS job"
            "  JOIN jobs_job_dependencies AS d ON d.child_id = job.id"
            " WHERE job.status = 'todo' AND job.jobs_parents_waiting > 0"
            " GROUP BY job.id ORDER BY job.id LIMIT %s",
            [limit],
        )
        rows = cursor.fetchall()
    return [
        {"job_id": r[0], "task": r[1], "queue": r[2], "parents_waiting": r[3], "waiting_for": r[4] or []} for r in rows
    ]


def dashboard_concurrency_limits(*, limit: int = 50) -> list[dict[str, Any]]:
    """The concurrency limits in force (migration 0012): each key with jobs running or waiting,
    its running count and limit, and how many of its jobs wait; the fullest keys first."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT job.jobs_concurrency_key, min(job.jobs_concurrency_limit),"
            "       count(*) FILTER (WHERE job.status = 'doing'), count(*) FILTER (WHERE job.status = 'todo'),"
            "       coalesce(max(slot.running), 0)"
            "  FROM procrastinate_jobs AS job"
            "  LEFT JOIN jobs_concurrency_slots AS slot ON slot.key = job.jobs_concurrency_key"
            " WHERE job.jobs_concurrency_key IS NOT NULL AND job.status IN ('todo', 'doing')"
            " GROUP BY job.jobs_concurrency_key"
            " ORDER BY count(*) FILTER (WHERE job.status = 'doing') DESC, count(*) DESC, job.jobs_concurrency_key"
            " LIMIT %s",
            [limit],
        )
        rows = cursor.fetchall()
    return [
        {"key": key, "limit": cap, "running": running, "waiting": waiting, "counted": counted}
        for key, cap, running, waiting, counted in rows
    ]
