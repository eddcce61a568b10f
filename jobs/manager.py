"""Procrastinate's job manager, changed where the worker spends its round trips.

- Claims: one query takes up to N jobs (as many as the worker has free slots), never from a
  paused queue (`jobs_paused_queues`, so a pause holds for every worker at its next fetch),
  never two jobs of one lock, highest priority first: Procrastinate's own
  `procrastinate_fetch_job_v2` rules, with `LIMIT n` instead of `LIMIT 1`.
- Completions: a finished job is written with the next batch (one UPDATE for every job that
  finished while the previous batch was being written), not one statement per job.
- Both commit with `synchronous_commit = off`: losing one in a database crash means a job runs
  again (it is still `doing`, and the stalled-job rescue retries it), never that one is lost.
  Deferring, which acknowledges a user's request, keeps synchronous commit.

A completion still waiting for its batch when the worker process dies leaves its job `doing`:
it runs again, as after any crash. A graceful stop writes the batch before unregistering.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from procrastinate import jobs as procrastinate_jobs
from procrastinate.manager import JobManager

logger = logging.getLogger(__name__)

WRITE_ATTEMPTS = 30  # about 30 s of a database outage before completions are left to the rescue

_NOT_DURABLE = "SELECT set_config('synchronous_commit', 'off', true)"

# The LIMIT is written into the text, not a parameter: psycopg prepares the statement, and with
# a parameter LIMIT PostgreSQL's generic plan assumes a large one and sorts every waiting job
# instead of walking the priority index (migration 0004 has the other half of this).
CLAIM_JOBS = """
WITH commit_mode AS (SELECT set_config('synchronous_commit', 'off', true)),
candidates AS (
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
       AND NOT jobs_queue_paused(jobs.queue_name)
     ORDER BY jobs.priority DESC, jobs.id ASC
     LIMIT {limit}
       FOR UPDATE OF jobs SKIP LOCKED
)
UPDATE procrastinate_jobs AS job
   SET status = 'doing', worker_id = %(worker_id)s
  FROM candidates, commit_mode
 WHERE job.id = candidates.id
RETURNING job.id, job.queue_name, job.task_name, job.priority, job.lock, job.queueing_lock, job.args,
          job.scheduled_at, job.attempts, job.status, job.abort_requested, job.worker_id
"""

# procrastinate_finish_job_v1 for many jobs at once.
FINISH_JOBS = f"""
WITH commit_mode AS ({_NOT_DURABLE}),
finished AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(statuses)s::procrastinate_job_status[]) AS f (id, status)
)
UPDATE procrastinate_jobs AS job
   SET status = finished.status,
       abort_requested = false,
       attempts = CASE job.status WHEN 'doing' THEN job.attempts + 1 ELSE job.attempts END
  FROM finished, commit_mode
 WHERE job.id = finished.id AND job.status IN ('todo', 'doing')
"""


class BatchingJobManager(JobManager):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._finished: list[tuple[int, str]] = []
        self._writer: asyncio.Task | None = None

    async def fetch_jobs(
        self, queues: Iterable[str] | None, worker_id: int, limit: int
    ) -> list[procrastinate_jobs.Job]:
        rows = await self.connector.execute_query_all_async(
            query=CLAIM_JOBS.format(limit=int(limit)),
            queues=list(queues) if queues is not None else None,
            worker_id=worker_id,
        )
        return [procrastinate_jobs.Job.from_row(row) for row in sorted(rows, key=_claim_order)]

    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> procrastinate_jobs.Job | None:
        jobs = await self.fetch_jobs(queues, worker_id, limit=1)
        return jobs[0] if jobs else None

    async def finish_job(self, job: procrastinate_jobs.Job, status: procrastinate_jobs.Status, delete_job: bool):
        if delete_job:
            await super().finish_job(job=job, status=status, delete_job=delete_job)
            return
        assert job.id is not None
        self._finished.append((job.id, status.value))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_finished(), name="write finished jobs")

    async def flush_finished(self) -> None:
        """Write every completion still waiting for its batch (a graceful stop calls it)."""
        if self._writer is not None and not self._writer.done():
            await self._writer
        if self._finished:
            await self._write_finished()

    async def unregister_worker(self, worker_id: int) -> None:
        await self.flush_finished()
        await super().unregister_worker(worker_id)

    async def _write_finished(self) -> None:
        # Completions arriving while one batch is written form the next one.
        failures = 0
        while self._finished:
            batch, self._finished = self._finished, []
            try:
                await self.connector.execute_query_async(
                    query=FINISH_JOBS, ids=[job_id for job_id, _ in batch], statuses=[s for _, s in batch]
                )
                failures = 0
            except Exception:
                failures += 1
                if failures > WRITE_ATTEMPTS:
                    # Left `doing`: the stalled-job rescue runs them again.
                    logger.exception("Gave up writing %d finished job(s)", len(batch))
                    continue
                logger.exception("Could not write %d finished job(s); retrying in 1 s", len(batch))
                self._finished = batch + self._finished
                await asyncio.sleep(1)


def _claim_order(row: dict) -> tuple[int, int]:
    return (-row["priority"], row["id"])
