"""Procrastinate's job manager, changed where the worker spends its round trips.

- Claims: one query takes up to N jobs (as many as the worker has free slots), never from a
  paused queue (`jobs_paused_queues`, so a pause holds for every worker at its next fetch),
  never two jobs of one lock, never a job whose parents have not ended (dependencies):
  Procrastinate's own `procrastinate_fetch_job_v2` rules, with `LIMIT n` instead of `LIMIT 1`,
  in the fair order (owners take turns, priorities below the service band order only their
  owner's work: jobs/tasking/fairness.py), or with JOBS_FAIR_CLAIMS=false in Procrastinate's,
  highest priority first. A job with a concurrency key is taken only while its key has a free
  slot (`jobs_concurrency_slots`, migration 0012): over its limit it stays `todo`, untouched,
  and the end that frees a slot wakes this worker (and NOTIFYs the queue where the key waits).
- Completions: a finished job is written with the next batch (one UPDATE for every job that
  finished while the previous batch was being written, or within JOBS_COMPLETION_WINDOW_MS of
  the first end waiting), not one statement per job, with each job's result (the task's
  returned value, JSON, kept for its `result_ttl`) written in `jobs_job_info`. A batch
  only ends jobs the writing worker still holds (`doing` under its id): a worker declared dead
  and rescued whose old run ends later drops that end (logged), the new run's stays. When an
  ended job had a `lock`, its successor must not wait for a poll: the worker is woken once the
  batch commits, and the statement NOTIFYs the queues where a job of that lock waits.
- `finish_job`, called directly (Procrastinate's public API), is Procrastinate's own: written
  before it returns, refusing a job that is not `todo`/`doing` and an end status of `todo`.
- Both commit with `synchronous_commit = off`: losing one in a database crash means a job runs
  again (it is still `doing`, and the stalled-job rescue retries it), never that one is lost.
  Deferring, which acknowledges a user's request, keeps synchronous commit.
- Retries: a job going back to `todo` while a newer job of its queueing lock waits there is
  superseded by it (ends `cancelled` with the reason) instead of failing on the unique index
  and staying `doing` (migration 0005, README "Queueing locks and retries").

A completion still waiting for its batch when the worker process dies leaves its job `doing`:
it runs again, as after any crash. A graceful stop writes the batch before unregistering.

A retry's time (a backoff, a rate-limit postponement) reaches the database as a wait, added to
the database's clock: a worker whose clock is off by minutes still retries on time.

While the database is unreachable (a restart, a failover), completions stay buffered and the
writer keeps trying until it answers; a stopping worker waits FLUSH_TIMEOUT_SECONDS for that.
The worker-row helpers at the end let a worker that outlived an outage put itself right
(jobs/engine/worker.py): re-register when another worker pruned its row, take back its jobs, and
re-queue jobs whose claim committed but whose answer was lost.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from django.conf import settings
from procrastinate import jobs as procrastinate_jobs
from procrastinate import utils
from procrastinate.manager import JobManager
from psycopg.types.json import Jsonb

from jobs.engine.connector import is_connection_error
from jobs.tasking.fairness import SERVICE_PRIORITY
from jobs.tasking.registry import task_options

logger = logging.getLogger(__name__)

WRITE_ATTEMPTS = 30  # for errors other than a lost database, which are retried until it is back
WRITE_RETRY_MAX_DELAY = 1.0
FLUSH_TIMEOUT_SECONDS = 30.0  # a stopping worker's wait for its completions to be written

_NOT_DURABLE = "SELECT set_config('synchronous_commit', 'off', true)"

# The LIMIT is written into the text, not a parameter: psycopg prepares the statement, and with
# a parameter LIMIT PostgreSQL's generic plan assumes a large one and sorts every waiting job
# instead of walking the priority index (migration 0004 has the other half of this).
CLAIM_JOBS = """
WITH commit_mode AS (SELECT set_config('synchronous_commit', 'off', true)),
candidates AS (
    SELECT jobs.id, jobs.priority, jobs.fair_round,
           jobs.jobs_concurrency_key AS concurrency_key, jobs.jobs_concurrency_limit AS concurrency_limit
      FROM procrastinate_jobs AS jobs
     -- A job of a lock waits for the lock's running job and its more urgent ones. Written as
     -- an OR, not as Procrastinate's NOT EXISTS: the planner cannot turn it into an anti join,
     -- which under a queue's stale statistics joined every waiting job with every other
     -- (millions of rows a claim); the lookup runs only for a job that has a lock.
     WHERE (jobs.lock IS NULL
            OR NOT EXISTS (
               SELECT 1
                 FROM procrastinate_jobs AS other_jobs
                WHERE other_jobs.lock = jobs.lock
                  AND (other_jobs.status = 'doing'
                       OR (other_jobs.status = 'todo'
                           AND (other_jobs.priority > jobs.priority
                                OR (other_jobs.priority = jobs.priority AND other_jobs.id < jobs.id))))
           ))
       AND jobs.status = 'todo'
       AND (%(queues)s::varchar[] IS NULL OR jobs.queue_name = ANY(%(queues)s::varchar[]))
       AND (jobs.scheduled_at IS NULL OR jobs.scheduled_at <= now())
       AND NOT jobs_queue_paused(jobs.queue_name)
       -- Dependencies: a job waits until every parent has ended (migration 0008).
       AND jobs.jobs_parents_waiting = 0
       -- Concurrency limits (migration 0012): not the jobs of a key whose slots are all taken
       -- (the full keys read once, then a hash probe per job walked past).
       AND (jobs.jobs_concurrency_key IS NULL
            OR jobs.jobs_concurrency_key NOT IN (SELECT slot.key FROM jobs_concurrency_slots AS slot
                                                  WHERE slot.running >= slot.concurrency_limit))
     ORDER BY {order}
     LIMIT {limit}
       FOR UPDATE OF jobs SKIP LOCKED
),
-- The keys' slot rows, locked in key order and read at their latest version (a concurrent claim
-- of the key commits first): the exact count, whatever this statement's snapshot said.
slots AS (
    INSERT INTO jobs_concurrency_slots AS slot (key, concurrency_limit)
    SELECT concurrency_key, min(concurrency_limit) FROM candidates
     WHERE concurrency_key IS NOT NULL GROUP BY concurrency_key ORDER BY concurrency_key
    ON CONFLICT (key) DO UPDATE SET concurrency_limit = EXCLUDED.concurrency_limit
    RETURNING slot.key, GREATEST(slot.running, 0) AS running, slot.concurrency_limit
),
-- Of each key's candidates, in the claim's order, as many as it has free slots.
granted AS (
    SELECT jobs.id
      FROM (SELECT jobs.id, jobs.concurrency_key,
                   row_number() OVER (PARTITION BY jobs.concurrency_key ORDER BY {order}) AS place
              FROM candidates AS jobs
             WHERE jobs.concurrency_key IS NOT NULL) AS jobs
      JOIN slots ON slots.key = jobs.concurrency_key
     WHERE jobs.place <= slots.concurrency_limit - slots.running
)
UPDATE procrastinate_jobs AS job
   SET status = 'doing', worker_id = %(worker_id)s
  FROM candidates, commit_mode
 WHERE job.id = candidates.id
   AND (candidates.concurrency_key IS NULL OR candidates.id IN (SELECT id FROM granted))
RETURNING job.id, job.queue_name, job.task_name, job.priority, job.lock, job.queueing_lock, job.args,
          job.scheduled_at, job.attempts, job.status, job.abort_requested, job.worker_id,
          job.jobs_concurrency_key,
          -- Fewer candidates than the LIMIT: the claim saw every job it could take (the worker's
          -- fetch loop then waits for a NOTIFY instead of claiming again for nothing).
          (SELECT count(*) FROM candidates) AS jobs_candidates
"""
# Fair claims (jobs/tasking/fairness.py): the service band first, then each job's round, the
# order of migration 0009's jobs_fair_claim_idx (the expressions must be written as there).
# JOBS_FAIR_CLAIMS=false: Procrastinate's priority then age, on its priority index.
FAIR_ORDER = (
    f"GREATEST(jobs.priority, {SERVICE_PRIORITY - 1}) DESC, jobs.fair_round ASC NULLS FIRST,"
    " jobs.priority DESC, jobs.id ASC"
)
PRIORITY_ORDER = "jobs.priority DESC, jobs.id ASC"

# procrastinate_finish_job_v1 for many jobs at once, each only while its worker still holds it.
# The queues where a job waits for a lock one of these held hear of it (as of a new job).
FINISH_JOBS = f"""
WITH commit_mode AS ({_NOT_DURABLE}),
-- The concurrency slots these ends free, locked first and in key order: the two triggers
-- (deleted rows, updated rows) would otherwise lock them in two passes, against a claim's order.
slot_locks AS (
    SELECT key FROM jobs_concurrency_slots WHERE key = ANY(%(keys)s::text[]) ORDER BY key FOR UPDATE
),
finished AS (
    SELECT *
      FROM unnest(%(ids)s::bigint[], %(statuses)s::procrastinate_job_status[], %(worker_ids)s::bigint[],
                  %(deletes)s::boolean[], %(results)s::text[], %(ttls)s::float8[])
           AS f (id, status, worker_id, delete_job, result, ttl)
),
-- Each job by its primary key alone: the row test `(status, worker_id) IS NOT DISTINCT FROM`
-- matches no index and implies no partial index's predicate. Written `status = 'doing' AND
-- worker_id = ...`, the generic plan walked the partial index of `doing` jobs by worker, which
-- the planner sizes at the few running jobs but which holds an entry for every job the worker
-- ran since the last vacuum (live to scans while a long statement holds the horizon back),
-- once per finished job: quadratic in the batch. In the soak (bench/soak.py) one batch took
-- 98 s while the worker kept claiming, and 35,000 jobs waited `doing` for their end.
deleted AS (
    DELETE FROM procrastinate_jobs AS job
     USING finished
     WHERE job.id = finished.id AND finished.delete_job
       AND (job.status, job.worker_id) IS NOT DISTINCT FROM ('doing', finished.worker_id)
       AND (SELECT count(*) FROM slot_locks) >= 0
    RETURNING job.id, job.lock, job.jobs_concurrency_key
),
updated AS (
    UPDATE procrastinate_jobs AS job
       SET status = finished.status, abort_requested = false, attempts = job.attempts + 1
      FROM finished, commit_mode
     WHERE job.id = finished.id AND NOT finished.delete_job
       AND (job.status, job.worker_id) IS NOT DISTINCT FROM ('doing', finished.worker_id)
       AND (SELECT count(*) FROM slot_locks) >= 0
    RETURNING job.id, job.lock, job.jobs_concurrency_key
),
ended AS (SELECT * FROM deleted UNION ALL SELECT * FROM updated),
-- The results of the jobs ended here (and kept): in the same statement as the end, so a reader
-- sees both or neither, and only for a job this worker still held.
results AS (
    INSERT INTO jobs_job_info (job_id, result, result_expires_at)
    SELECT finished.id, finished.result::jsonb, now() + make_interval(secs => finished.ttl)
      FROM finished JOIN updated ON updated.id = finished.id
     WHERE finished.result IS NOT NULL
    ON CONFLICT (job_id) DO UPDATE SET result = EXCLUDED.result, result_expires_at = EXCLUDED.result_expires_at,
                                       error = ''
),
-- The queues of the jobs that waited for the ended jobs' locks. Looked up from each ended lock
-- (OFFSET 0 keeps the lookup inside the loop): a join the planner could turn around read every
-- waiting job on each batch of completions, lock or not, under a queue's stale statistics.
woken_queues AS (
    SELECT DISTINCT waiting.queue_name
      FROM (SELECT DISTINCT lock FROM ended WHERE lock IS NOT NULL) AS ended_locks,
           LATERAL (SELECT waiting.queue_name FROM procrastinate_jobs AS waiting
                     WHERE waiting.lock = ended_locks.lock AND waiting.status = 'todo' OFFSET 0) AS waiting
),
woken AS (
    SELECT pg_notify(channel, '{{"type": "job_inserted"}}')
      FROM (SELECT 'procrastinate_queue_v1#' || queue_name AS channel FROM woken_queues
            UNION ALL
            SELECT 'procrastinate_any_queue_v1' WHERE EXISTS (SELECT 1 FROM woken_queues)) AS channels
)
SELECT id, lock, jobs_concurrency_key FROM ended WHERE (SELECT count(*) FROM woken) >= 0
"""


# procrastinate_defer_jobs_v1's insert, with each job's concurrency key and limit (migration 0012).
DEFER_LIMITED_JOBS = """
INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, queueing_lock, args, scheduled_at,
                                jobs_concurrency_key, jobs_concurrency_limit)
SELECT queue_name, task_name, priority, lock, queueing_lock, args, scheduled_at, key, concurrency_limit
  FROM unnest(%(queues)s::varchar[], %(tasks)s::varchar[], %(priorities)s::integer[], %(locks)s::text[],
              %(queueing_locks)s::text[], %(args)s::jsonb[], %(scheduled_ats)s::timestamptz[], %(keys)s::text[],
              %(limits)s::integer[])
       WITH ORDINALITY AS j (queue_name, task_name, priority, lock, queueing_lock, args, scheduled_at, key,
                             concurrency_limit, n)
 ORDER BY n
RETURNING id
"""

# procrastinate_retry_job_v2 with the retry time taken from the database's clock.
# The worker's own row, and its jobs (see jobs/engine/worker.py: after a database outage).
SET_WORKER_HOST = "UPDATE procrastinate_workers SET jobs_host = %(host)s WHERE id = %(worker_id)s"
HEARTBEAT = "UPDATE procrastinate_workers SET last_heartbeat = now() WHERE id = %(worker_id)s RETURNING id"
ADOPT_JOBS = """
UPDATE procrastinate_jobs SET worker_id = %(worker_id)s
 WHERE id = ANY(%(ids)s::bigint[]) AND status = 'doing' AND worker_id IS NULL
"""
# One job at a time, in the database (migration 0005): a job whose queueing lock has a newer
# job waiting is superseded by it rather than failing the whole statement on the unique index.
REQUEUE_ORPHANS = "SELECT job_id, superseded_by FROM jobs_requeue_orphans_v1(%(worker_id)s, %(keep)s::bigint[])"

# procrastinate_retry_job_v2, with a job waiting with the same queueing lock superseding the
# retried one (migration 0005); returns that job's id, NULL when the job was retried.
# Procrastinate's decisions (`retry_in`, our `Postponed`) are "now + a wait" on this host's
# clock: the wait is taken back out and added to the database's clock instead (one clock).
RETRY_JOB = """
SELECT jobs_retry_job_v1(
    %(job_id)s, now() + make_interval(secs => %(wait)s), %(new_priority)s, %(new_queue_name)s, %(new_lock)s
) AS superseded_by
"""


class _End(NamedTuple):
    """A job's end waiting for its batch: written only while `worker_id` still holds the job."""

    job_id: int
    status: str
    worker_id: int
    lock: str | None
    delete: bool
    concurrency_key: str | None = None  # its end frees one of the key's slots
    result: str | None = None  # the task's returned value as JSON text, kept for `ttl` seconds
    ttl: float | None = None

    @property
    def frees(self) -> bool:
        return self.lock is not None or self.concurrency_key is not None


class BatchingJobManager(JobManager):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._finished: list[_End] = []
        self._writing: list[_End] = []  # the batch being written right now
        self._writer: asyncio.Task | None = None
        self._lock_listeners: list[Callable[[], None]] = []
        self._adopted: dict[int, int] = {}  # job id -> the worker id that took it back
        self._keyed: dict[int, str] = {}  # running jobs claimed here that hold a concurrency slot: their key
        # Someone waits for the write (a stop, a lock's successor): the completion window closes.
        self._write_now = False
        self._window: asyncio.Future | None = None  # the batch's wait for more ends, while it waits
        # Whether the last claim took every job it could (it found fewer than it asked for), so
        # that a claim made now would find none that was there then (see `fetch_jobs`).
        self.last_claim_drained = False

    async def fetch_jobs(
        self, queues: Iterable[str] | None, worker_id: int, limit: int
    ) -> list[procrastinate_jobs.Job]:
        order = FAIR_ORDER if settings.JOBS_FAIR_CLAIMS else PRIORITY_ORDER
        rows = await self.connector.execute_query_all_async(
            query=CLAIM_JOBS.format(limit=int(limit), order=order),
            queues=list(queues) if queues is not None else None,
            worker_id=worker_id,
        )
        # An empty claim drained the queue too (nothing returned, nothing counted); a claim that
        # found as many candidates as it asked for may have left others behind them.
        self.last_claim_drained = not rows or rows[0]["jobs_candidates"] < limit
        self._keyed.update((row["id"], row["jobs_concurrency_key"]) for row in rows if row["jobs_concurrency_key"])
        return [procrastinate_jobs.Job.from_row(row) for row in sorted(rows, key=_claim_order)]

    # Procrastinate's own defers (`task.defer()`, `batch_defer()`, sync and async) build their
    # query here: jobs of a task with a concurrency limit get their key and limit (no owner: a
    # key over `owner_id` reads None), the others keep Procrastinate's own insert.
    def _defer_jobs_query_kwargs(self, jobs: list[procrastinate_jobs.Job]) -> dict:
        slots = [task_options(job.task_name).concurrency_slot(job.task_kwargs, owner_id=None) for job in jobs]
        if all(key is None for key, _ in slots):
            return super()._defer_jobs_query_kwargs(jobs)
        return {
            "query": DEFER_LIMITED_JOBS,
            "queues": [job.queue for job in jobs],
            "tasks": [job.task_name for job in jobs],
            "priorities": [job.priority for job in jobs],
            "locks": [job.lock for job in jobs],
            "queueing_locks": [job.queueing_lock for job in jobs],
            "args": [Jsonb(job.task_kwargs) for job in jobs],
            "scheduled_ats": [job.scheduled_at for job in jobs],
            "keys": [key for key, _ in slots],
            "limits": [cap for _, cap in slots],
        }

    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> procrastinate_jobs.Job | None:
        jobs = await self.fetch_jobs(queues, worker_id, limit=1)
        return jobs[0] if jobs else None

    def finish_job_later(
        self,
        job: procrastinate_jobs.Job,
        status: procrastinate_jobs.Status,
        *,
        worker_id: int,
        delete_job: bool,
        result: Any = None,
    ) -> None:
        """A worker's end of a job it ran, written with the next batch if `worker_id` still holds
        the job then (BatchingWorker calls it; `finish_job` is the direct, unbatched call), with
        its result unless that is None."""
        assert job.id is not None
        key = self._keyed.pop(job.id, None)
        stored, ttl = None, None
        if result is not None:
            stored = _json_text(result)
            ttl = task_options(job.task_name).result_ttl
            ttl = float(settings.JOBS_RESULT_TTL_SECONDS if ttl is None else ttl)
        self._finished.append(_End(job.id, status.value, worker_id, job.lock, delete_job, key, stored, ttl))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_finished(), name="write finished jobs")

    def on_lock_released(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after a batch that ended a job with a lock or a concurrency key commits
        (a worker's fetch loop: the successor of that lock, or a job waiting for a slot of that
        key, can be claimed now). Returns the unsubscribe call."""
        self._lock_listeners.append(listener)
        return lambda: self._lock_listeners.remove(listener)

    def lock_release_pending(self) -> bool:
        """Whether an end waiting for its batch, or being written, frees a lock or a slot."""
        return any(end.frees for end in self._writing + self._finished)

    async def wait_written(self) -> None:
        """Until the ends buffered now are written (or the writer gives up on them)."""
        self._close_window()
        if self._finished and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write_finished(), name="write finished jobs")
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        self._window_may_open()

    def pending_completion_ids(self) -> list[int]:
        """Jobs that ended in this process but are still `doing` in the database until written."""
        return [end.job_id for end in self._writing + self._finished]

    async def flush_finished(self, timeout: float = FLUSH_TIMEOUT_SECONDS) -> None:
        """Write every completion still waiting for its batch (a graceful stop calls it). Gives up
        after `timeout` seconds of a database that does not answer: those jobs stay `doing`,
        and the stalled-job rescue runs them again once this worker is gone."""
        self._close_window()
        if self._finished and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write_finished(), name="write finished jobs")
        if self._writer is None or self._writer.done():
            self._window_may_open()
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), timeout)
        except TimeoutError:
            self._writer.cancel()
            logger.error(
                "Gave up writing %d finished job(s) after %.0f s; they will run again",
                len(self.pending_completion_ids()),
                timeout,
            )
        finally:
            self._window_may_open()

    async def register_worker(self) -> int:
        """Procrastinate's registration, then this host's name on the row (migration 0014)."""
        worker_id = await super().register_worker()
        await self.connector.execute_query_async(
            query=SET_WORKER_HOST, worker_id=worker_id, host=settings.WORKER_HOSTNAME
        )
        logger.info("Worker %s registered on host %s", worker_id, settings.WORKER_HOSTNAME)
        return worker_id

    async def unregister_worker(self, worker_id: int) -> None:
        await self.flush_finished()
        await super().unregister_worker(worker_id)

    async def _write_finished(self) -> None:
        # Completions arriving while one batch is written form the next one.
        failures = 0
        while self._finished:
            await self._gather_ends()
            batch, self._finished = self._finished, []
            self._writing = batch
            with_results = any(end.result is not None for end in batch)
            try:
                rows = await self.connector.execute_query_all_async(
                    query=FINISH_JOBS,
                    ids=[end.job_id for end in batch],
                    statuses=[end.status for end in batch],
                    worker_ids=[self._adopted.get(end.job_id, end.worker_id) for end in batch],
                    deletes=[end.delete for end in batch],
                    # NULL when no job of the batch has a result (no-op jobs): unnest pads a NULL
                    # array with NULLs, and psycopg need not scan a list of None for its type.
                    results=[end.result for end in batch] if with_results else None,
                    ttls=[end.ttl for end in batch] if with_results else None,
                    keys=sorted({end.concurrency_key for end in batch if end.concurrency_key is not None}),
                )
            except Exception as exc:
                self._writing = []
                failures += 1
                if not is_connection_error(exc) and failures > WRITE_ATTEMPTS:
                    # Left `doing`: the worker re-queues them (or the stalled-job rescue does).
                    logger.exception("Gave up writing %d finished job(s)", len(batch))
                    continue
                if failures == 1:
                    logger.warning("Could not write %d finished job(s) (%s); retrying", len(batch), _reason(exc))
                self._finished = batch + self._finished
                await asyncio.sleep(min(WRITE_RETRY_MAX_DELAY, 0.05 * 2**failures))
                continue
            self._writing = []
            for end in batch:
                self._adopted.pop(end.job_id, None)
            if failures:
                logger.warning("Wrote finished jobs after %d failed attempt(s)", failures)
                failures = 0
            self._after_batch(batch, rows)
        self._write_now = False  # everything asked for is written

    async def _gather_ends(self) -> None:
        """Let the ends of jobs finishing in the next JOBS_COMPLETION_WINDOW_MS join the batch:
        not when one frees a lock or a slot (its successor waits for this write), nor when
        someone waits for the write (`wait_written`, `flush_finished`)."""
        window = settings.JOBS_COMPLETION_WINDOW_MS / 1000
        if window and not self._write_now and not any(end.frees for end in self._finished):
            self._window = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait([self._window], timeout=window)
            finally:
                self._window = None

    def _close_window(self) -> None:
        self._write_now = True
        if self._window is not None and not self._window.done():
            self._window.set_result(None)

    def _window_may_open(self) -> None:
        """After a wait for the write: the next batch waits for more ends again."""
        if self._writer is None or self._writer.done():
            self._write_now = False

    def _after_batch(self, batch: list[_End], rows: list[dict]) -> None:
        ended = {row["id"] for row in rows}
        stale = [end for end in batch if end.job_id not in ended]
        if stale:
            # Its worker was declared dead meanwhile (a pause, a network cut): the job was rescued,
            # and it belongs to another run now (or has ended), whose outcome stands.
            logger.warning(
                "Dropped the end of %d job(s) no longer held by this worker: %s",
                len(stale),
                ", ".join(f"{end.job_id} ({end.status}, worker {end.worker_id})" for end in stale),
            )
        if any(row["lock"] is not None or row["jobs_concurrency_key"] is not None for row in rows):
            for listener in list(self._lock_listeners):
                listener()

    # --- The worker's row and its jobs --------------------------------------------------------
    async def heartbeat(self, worker_id: int) -> bool:
        """Update the worker's heartbeat; False when its row is gone (another worker pruned it
        while this one could not reach the database)."""
        rows = await self.connector.execute_query_all_async(query=HEARTBEAT, worker_id=worker_id)
        return bool(rows)

    async def adopt_jobs(self, worker_id: int, job_ids: list[int]) -> None:
        """Mark these running jobs as `worker_id`'s again (their worker row was deleted, which
        left them without a worker, for the stalled-job rescue to take)."""
        if job_ids:
            await self.connector.execute_query_async(query=ADOPT_JOBS, worker_id=worker_id, ids=job_ids)
            # Their ends waiting for a batch (or being written, or retried) are this id's now.
            self._adopted.update(dict.fromkeys(job_ids, worker_id))

    async def requeue_orphans(self, worker_id: int, keep: list[int]) -> tuple[list[int], dict[int, int]]:
        """Put back to `todo` the jobs the database says `worker_id` runs but it does not know of
        (claimed by a statement that committed while its answer was lost), or whose end could not
        be written. Not spending an attempt: they never ran, or ran to an end nobody recorded.

        Returns the re-queued ids, and the ids superseded by a job already waiting with their
        queueing lock (`{superseded: waiting}`, see migration 0005)."""
        rows = await self.connector.execute_query_all_async(query=REQUEUE_ORPHANS, worker_id=worker_id, keep=keep)
        requeued = [row["job_id"] for row in rows if row["superseded_by"] is None]
        superseded = {row["job_id"]: row["superseded_by"] for row in rows if row["superseded_by"] is not None}
        return requeued, superseded

    # --- Retries: a job waiting with the same queueing lock supersedes the retried one ---------
    # Every automatic retry goes through these: the worker's retry decision (`retry_job`), the
    # stalled-job rescue. Procrastinate's own SQL fails on the queueing-lock index instead, which
    # left the job `doing` for good (see migration 0005).
    async def retry_job(
        self,
        job: procrastinate_jobs.Job,
        retry_at: datetime.datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        lock: str | None = None,
    ) -> int | None:
        assert job.id is not None
        self._keyed.pop(job.id, None)  # its slot is freed by this write (the trigger of migration 0012)
        return await self.retry_job_by_id_async(
            job_id=job.id, retry_at=retry_at or utils.utcnow(), priority=priority, queue=queue, lock=lock
        )

    async def retry_job_by_id_async(
        self,
        job_id: int,
        retry_at: datetime.datetime,
        priority: int | None = None,
        queue: str | None = None,
        lock: str | None = None,
    ) -> int | None:
        """Retry the job, or end it superseded by the job of its queueing lock waiting already.
        Returns that job's id when superseded, else None."""
        row = await self.connector.execute_query_one_async(
            query=RETRY_JOB, **_retry_params(job_id, retry_at, priority, queue, lock)
        )
        return _superseded(job_id, row["superseded_by"])

    def retry_job_by_id(
        self,
        job_id: int,
        retry_at: datetime.datetime,
        priority: int | None = None,
        queue: str | None = None,
        lock: str | None = None,
    ) -> int | None:
        row = self.connector.get_sync_connector().execute_query_one(
            query=RETRY_JOB, **_retry_params(job_id, retry_at, priority, queue, lock)
        )
        return _superseded(job_id, row["superseded_by"])


def _retry_params(
    job_id: int, retry_at: datetime.datetime, priority: int | None, queue: str | None, lock: str | None
) -> dict:
    return {
        "job_id": job_id,
        "wait": (retry_at - utils.utcnow()).total_seconds(),
        "new_priority": priority,
        "new_queue_name": queue,
        "new_lock": lock,
    }


def _superseded(job_id: int, waiting_id: int | None) -> int | None:
    if waiting_id is not None:
        logger.warning(
            "Job %s was not retried: job %s waits with the same queueing lock and does its work (job %s cancelled)",
            job_id,
            waiting_id,
            job_id,
        )
    return waiting_id


def _json_text(value: Any) -> str:
    """A result as it is stored: its JSON, or its repr's when JSON cannot hold it (NaN included:
    PostgreSQL's jsonb refuses it, and one bad value would fail its whole batch of ends). Text,
    not a driver's JSON wrapper, so that any connector sends it (Procrastinate's own suite runs
    this manager on aiopg too)."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(repr(value))


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


def _claim_order(row: dict) -> tuple[int, int]:
    return (-row["priority"], row["id"])
