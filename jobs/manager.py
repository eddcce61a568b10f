"""Procrastinate's job manager with one change: a worker never fetches from a paused queue.

The fetch is Procrastinate's own `procrastinate_fetch_job_v2` query plus one condition on
`jobs_paused_queues`, so a pause holds for every worker process at its next fetch.
"""

from __future__ import annotations

from collections.abc import Iterable

from procrastinate import exceptions
from procrastinate import jobs as procrastinate_jobs
from procrastinate.manager import JobManager

# Procrastinate's fetch (schema.sql, procrastinate_fetch_job_v2) with the paused-queue filter.
FETCH_JOB = """
WITH candidate AS (
    SELECT jobs.id
      FROM procrastinate_jobs AS jobs
     WHERE NOT EXISTS (
               SELECT 1
                 FROM procrastinate_jobs AS other_jobs
                WHERE jobs.lock IS NOT NULL
                  AND other_jobs.lock = jobs.lock
                  AND (other_jobs.status = 'doing'
                       OR (other_jobs.status = 'todo'
                           AND (other_jobs.priority > jobs.priority
                                OR (other_jobs.priority = jobs.priority AND other_jobs.id < jobs.id))))
           )
       AND jobs.status = 'todo'
       AND (%(queues)s::varchar[] IS NULL OR jobs.queue_name = ANY(%(queues)s::varchar[]))
       AND (jobs.scheduled_at IS NULL OR jobs.scheduled_at <= now())
       AND NOT EXISTS (SELECT 1 FROM jobs_paused_queues AS paused WHERE paused.queue_name = jobs.queue_name)
     ORDER BY jobs.priority DESC, jobs.id ASC
     LIMIT 1
       FOR UPDATE OF jobs SKIP LOCKED
)
UPDATE procrastinate_jobs
   SET status = 'doing', worker_id = %(worker_id)s
  FROM candidate
 WHERE procrastinate_jobs.id = candidate.id
RETURNING procrastinate_jobs.id, procrastinate_jobs.queue_name, procrastinate_jobs.task_name,
          procrastinate_jobs.priority, procrastinate_jobs.lock, procrastinate_jobs.queueing_lock,
          procrastinate_jobs.args, procrastinate_jobs.scheduled_at, procrastinate_jobs.attempts,
          procrastinate_jobs.status, procrastinate_jobs.abort_requested, procrastinate_jobs.worker_id
"""


class PausableJobManager(JobManager):
    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> procrastinate_jobs.Job | None:
        try:
            row = await self.connector.execute_query_one_async(
                query=FETCH_JOB, queues=list(queues) if queues is not None else None, worker_id=worker_id
            )
        except exceptions.NoResult:  # nothing to take
            return None
        return procrastinate_jobs.Job.from_row(row)
