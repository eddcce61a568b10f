"""Procrastinate's worker, taking as many jobs per query as it has free slots.

Stock Procrastinate fetches one job per query, then waits for that round trip before it can
fetch the next: with short jobs the worker spends its time waiting on the database. Here a
fetch takes every free slot at once (`BatchingJobManager.fetch_jobs`), so a worker at
concurrency 10 makes one claim for up to 10 jobs. While its jobs are short (a
moving average of their run times under JOBS_CLAIM_AHEAD_MS) it also claims its next jobs while
every slot is still busy, so the claim's round trip overlaps the running jobs instead of
leaving the worker idle until it answers: those jobs are held `doing` here and start on the
slots as they free, and a stop hands back the ones that never started. With longer jobs it
never claims more jobs than it can start at once, so a claimed job is never left waiting
behind a long one while another worker idles.

It also outlives a database outage (a restart, a failover), where stock Procrastinate stops:
its fetch loop, heartbeat, NOTIFY listener and periodic deferrer each retry with a short
backoff until the database answers, and the ends of jobs wait in memory meanwhile
(jobs/engine/manager.py). Once it is back, the worker puts its state right: a new worker row if
another worker pruned its silent one (taking its running jobs back), and the jobs the database
says it runs but it does not know of (a claim whose answer was lost) go back to the queue.

Each time it registers it records its id in settings.WORKER_ID_FILE, so a container's health
check can look up its own heartbeat (`manage.py jobs_worker_health`).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from django.conf import settings
from procrastinate import exceptions, job_context, middleware, types, utils
from procrastinate import jobs as procrastinate_jobs
from procrastinate.worker import Worker

from core.tracing import tracer, tracing_flush
from jobs.engine.connector import is_connection_error
from jobs.engine.manager import BatchingJobManager
from jobs.engine.periodic import ZonedPeriodicDeferrer

logger = logging.getLogger(__name__)
_upstream_logger = logging.getLogger("procrastinate.worker")  # where Worker._log_job_outcome logs

RETRY_FIRST_DELAY = 0.1  # seconds before the first new attempt after a lost database
RETRY_MAX_DELAY = 1.0  # and never longer than this between attempts
PERSIST_RETRY_SECONDS = 120.0  # how long a job's retry decision waits for the database
RUN_TIME_WEIGHT = 0.2  # of the last job in the moving average of run times (claiming ahead)


class _Backoff:
    def __init__(self) -> None:
        self.attempts = 0

    def next_delay(self) -> float:
        self.attempts += 1
        delay = min(RETRY_MAX_DELAY, RETRY_FIRST_DELAY * 2 ** (self.attempts - 1))
        return delay * random.uniform(0.8, 1.2)  # workers restarting together do not knock together

    def reset(self) -> None:
        self.attempts = 0


class BatchingWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._database_lost_at: float | None = None
        self._check_own_jobs = False  # set by an outage: re-queue jobs this worker lost track of
        self._jobs_ended = 0  # how many jobs ran to their end in this process (a one-shot run's stop)
        self._register_lock = asyncio.Lock()
        self._task_middlewares: dict[tuple[str, bool], tuple[Any, list]] = {}
        # Claimed ahead of a free slot (`doing` under this worker, not started): the next ends
        # start them on their slots; a stop hands back those left (`_hand_back_held`).
        self._held: deque[procrastinate_jobs.Job] = deque()
        self._held_emptied = asyncio.Event()  # the last held job started: time to claim ahead
        self._run_ms: float | None = None  # moving average of the run times of the last jobs
        # The next claim is a plain one, made once a slot frees: a claim ahead failed, or found
        # the queue drained (a running job's retry, say, is found by that claim, as without one).
        self._claim_ahead_off = False

    async def run(self) -> None:
        # Sync tasks run in the loop's default executor, which Python sizes by CPU count (6
        # threads on 2 cores): give it a thread per job slot, or sync jobs queue for threads,
        # and as many again for runs abandoned at a time limit or an abort, which keep theirs
        # until they return. Threads are only started when needed.
        loop = asyncio.get_running_loop()
        threads = 2 * self.concurrency + 4
        loop.set_default_executor(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="job"))
        manager = self.app.job_manager
        assert isinstance(manager, BatchingJobManager)
        # The end of a job with a lock commits after its slot is free, so the claim that followed
        # may have found its successor still blocked: claim again once it has committed.
        unsubscribe = manager.on_lock_released(self._new_job_event.set)
        try:
            await super().run()
        finally:
            unsubscribe()
            if tracer() is not None:  # the last jobs' spans leave before the process does
                await asyncio.to_thread(tracing_flush)

    def _log_extra(self, action: str, context, job_result, **kwargs: Any) -> types.JSONDict:
        # Procrastinate builds this dict (with a copy of the whole job) for every log call of
        # every job, even when nothing is logged: only build it when INFO is on.
        if not self.logger.isEnabledFor(logging.INFO):
            return {"action": action}
        return super()._log_extra(action, context, job_result, **kwargs)

    def _resolve_task_middlewares(self, task, task_is_async: bool) -> list:
        # Procrastinate sorts the worker-wide task middlewares for every job, formatting a debug
        # line for each one it skips (a sync task skips the async ones) even with DEBUG off:
        # once per task and kind is enough, the lists do not change while the worker runs.
        key = (task.name, task_is_async)
        cached = self._task_middlewares.get(key)
        if cached is None or cached[0] is not task:
            cached = self._task_middlewares[key] = (task, super()._resolve_task_middlewares(task, task_is_async))
        return cached[1]

    async def _fetch_and_process_jobs(self) -> None:
        """Fetch and process jobs until there is none left or the worker is asked to stop
        (Procrastinate's loop, with a batch of claims per query, that waits out an outage)."""
        manager = self.app.job_manager
        assert isinstance(manager, BatchingJobManager)
        backoff = _Backoff()
        while not self._stop_event.is_set():
            if self._may_claim_ahead(manager):
                await self._claim_ahead(manager)
                continue
            acquire = asyncio.create_task(self._job_semaphore.acquire())
            waits = [acquire, self._stop_event.wait()]
            if self._held:
                waits.append(self._held_emptied.wait())
            await utils.wait_any(*waits)
            if not acquire.done() or self._stop_event.is_set():
                if acquire.done():
                    self._job_semaphore.release()
                if self._stop_event.is_set():
                    break
                continue  # every held job has started: claim ahead again, or wait for a slot
            await asyncio.sleep(0)  # let jobs finishing right now free their slots too
            if not self.wait:
                # It stops at the first empty claim: that claim must see the jobs that just ended
                # (a lock they held no longer blocks its next job).
                await manager.flush_finished()
            elif manager.lock_release_pending():
                # A claim that ran before that end commits would find the lock's next job blocked,
                # which then waits for the commit and one more claim: wait for the write instead.
                await utils.wait_any(manager.wait_written(), self._stop_event.wait())
            slots = 1
            while slots < self.concurrency and not self._job_semaphore.locked():
                await self._job_semaphore.acquire()  # free: returns at once
                slots += 1
            jobs = []
            failed = False
            # Cleared before the claim, not after it as in Procrastinate: a NOTIFY arriving while
            # the claim is in flight then still wakes the worker. Inserts NOTIFY once per
            # statement here (migration 0003), so a wake-up cleared after the claim is lost.
            self._new_job_event.clear()
            ended_before_claim = self._jobs_ended
            try:
                assert self.worker_id is not None
                jobs = await manager.fetch_jobs(queues=self.queues, worker_id=self.worker_id, limit=slots)
            except Exception as exc:
                failed = True
                if is_connection_error(exc):
                    self._database_lost("claiming jobs", exc)
                elif _is_missing_worker_row(exc):
                    try:
                        await self._reregister("its worker row was deleted")
                    except Exception as again:
                        if not is_connection_error(again):
                            raise
                        self._database_lost("registering again", again)
                else:
                    raise
            finally:
                for _ in range(slots - len(jobs)):
                    self._job_semaphore.release()
            if failed:
                await utils.wait_any(asyncio.sleep(backoff.next_delay()), self._stop_event.wait())
                continue
            backoff.reset()
            self._database_back()
            self._claim_ahead_off = False
            for job in jobs:
                self._start(job)
            if self._check_own_jobs and await self._requeue_lost_jobs():
                continue  # some went back to the queue: claim them (or others) now
            if self.wait and jobs and manager.last_claim_drained:
                # Fewer jobs waited than there were free slots, and the claim took them all: a
                # claim now would come back empty (a job deferred since then NOTIFYs, and the
                # wake-up was cleared before this claim). Wait for a NOTIFY or the next poll
                # instead of a second round trip that competes with the jobs just started.
                break
            if not jobs:
                if self.wait:
                    break  # the queue is empty for now: wait for a NOTIFY or the next poll
                # wait=False stops once the queue is empty, but a running job may hold a lock,
                # defer a job or be the parent of one: claim again when one of them ends. A job
                # that ended while this claim was in flight counts too, and so does an end still
                # waiting to be written: the claim may have run before it was (the top of the
                # loop writes it). An end can be handed over while the top's write of the ends
                # before it finishes, and be counted before the claim.
                if self._running_jobs:
                    await utils.wait_any(
                        asyncio.wait(list(self._running_jobs), return_when=asyncio.FIRST_COMPLETED),
                        self._stop_event.wait(),
                    )
                elif self._jobs_ended == ended_before_claim and not manager.pending_completion_ids():
                    break

    def _may_claim_ahead(self, manager: BatchingJobManager) -> bool:
        """Whether to claim the next jobs now, though no slot is free: every slot is busy,
        nothing is held yet, and the last jobs were short enough (JOBS_CLAIM_AHEAD_MS) that a
        held job waits less than a claim's round trip would have left the slots idle. Not for
        a one-shot worker (it stops on an empty claim), not after a claim found the queue
        drained or failed (the plain claim comes next), nor while an end that frees a lock or a
        slot waits to be written (the plain claim after it finds the successor)."""
        limit_ms = settings.JOBS_CLAIM_AHEAD_MS
        return (
            self.wait
            and limit_ms > 0
            and self._run_ms is not None
            and self._run_ms <= limit_ms
            and not self._held
            and self._job_semaphore.locked()
            and not manager.last_claim_drained
            and not manager.lock_release_pending()
            and not self._check_own_jobs
            and not self._claim_ahead_off
        )

    async def _claim_ahead(self, manager: BatchingJobManager) -> None:
        """Claim up to `concurrency` jobs to hold until slots free, and start those whose slot
        freed while the claim was in flight. It never replaces the plain claim: when it took the
        last waiting jobs (or failed), the next claim is the plain one once a slot frees, as it
        would have been without it."""
        self._new_job_event.clear()  # before the claim: a NOTIFY during it still wakes the worker
        assert self.worker_id is not None
        try:
            jobs = await manager.fetch_jobs(queues=self.queues, worker_id=self.worker_id, limit=self.concurrency)
        except Exception:
            # The plain claim meets the same error and deals with it (an outage's backoff, a
            # worker row to register again).
            self._claim_ahead_off = True
            return
        self._claim_ahead_off = not jobs or manager.last_claim_drained
        self._held.extend(jobs)
        if self._held:
            self._held_emptied.clear()
        while self._held and not self._job_semaphore.locked() and not self._stop_event.is_set():
            await self._job_semaphore.acquire()  # free: returns at once
            self._start(self._held.popleft())

    async def _shutdown(self, side_tasks: list[asyncio.Task[Any]]) -> None:
        # Held jobs never start once the worker stops: back to the queue before the running
        # jobs are waited for, so other workers take them meanwhile.
        await self._hand_back_held()
        await super()._shutdown(side_tasks)

    async def _hand_back_held(self) -> None:
        if not self._held or self.worker_id is None:
            return
        manager = self.app.job_manager
        assert isinstance(manager, BatchingJobManager)
        held = [job.id for job in self._held]
        self._held.clear()
        try:
            # Every job `doing` here that it no longer knows of (running or ending): the held
            # ones, and any a lost answer left behind.
            requeued, superseded = await manager.requeue_orphans(self.worker_id, keep=self._known_job_ids())
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self.logger.warning(
                "Could not hand back %d job(s) claimed ahead (%s): the stalled-job rescue runs them again",
                len(held),
                _reason(exc),
            )
            return
        self.logger.info(
            "Handed back %d job(s) claimed ahead that had not started: %s", len(requeued) + len(superseded), held
        )

    async def _process_job(self, context: job_context.JobContext) -> None:
        """Run one job and hand its end over (Procrastinate's, without its per-job overhead).

        Upstream's does the same steps with costs that add up at thousands of jobs a second
        (docs/performance.md): two log lines formatted (`job.call_string` renders the
        arguments) even with INFO off, a sync task handed to its thread through asgiref's
        `sync_to_async` (which also copies the context back), and the end written from a task
        of its own behind a shield. Here a log line is only formatted when it is logged, a sync
        task runs in the loop's executor in a copy of the context, and an end that needs no
        round trip (the batch of completions takes it) is handed over directly. (A sync task
        that calls asgiref's `async_to_sync` runs that coroutine in a loop of its own thread,
        not on the worker's loop: nothing of ours does.)"""
        job = context.job
        task = self.app.tasks.get(job.task_name)
        job_retry = None
        exc_info: bool | BaseException = False
        retry_decision = None
        job_result = job_context.JobResult(start_timestamp=context.start_timestamp)
        try:
            if not task:
                raise exceptions.TaskNotFound
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug(
                    f"Loaded job info, about to start job {job.call_string}",
                    extra=self._log_extra(context=context, action="loaded_job_info", job_result=job_result),
                )
            if self.logger.isEnabledFor(logging.INFO):
                self.logger.info(
                    f"Starting job {job.call_string}",
                    extra=self._log_extra(context=context, action="start_job", job_result=job_result),
                )
            job_args = [context] if task.pass_context else []
            task_is_async = inspect.iscoroutinefunction(task.func)
            middlewares = self._resolve_task_middlewares(task, task_is_async)

            async def run_job() -> Any:
                if task_is_async:

                    async def run_async_task() -> Any:
                        return await task(*job_args, **job.task_kwargs)

                    result = await middleware.compose(middlewares, run_async_task, context, self)()
                else:

                    def run_sync_task() -> Any:
                        return task(*job_args, **job.task_kwargs)

                    call = middleware.compose(middlewares, run_sync_task, context, self)
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(None, contextvars.copy_context().run, call)
                if inspect.isawaitable(result):  # a sync function that returned an awaitable
                    result = await result
                return result

            job_result.result = await middleware.compose(self.worker_middleware, run_job, context, self)()
        except BaseException as e:
            exc_info = e
            # An aborted job is retried only when the abort is a shutdown.
            if not isinstance(e, exceptions.JobAborted) or context.abort_reason() == job_context.AbortReason.SHUTDOWN:
                job_retry = task.get_retry_exception(exception=e, job=job) if task else None
                retry_decision = job_retry.retry_decision if job_retry else None
                if isinstance(e, exceptions.TaskNotFound):
                    self.logger.exception(
                        "Task was not found",
                        extra=self._log_extra(
                            context=context, action="task_not_found", exception=str(e), job_result=job_result
                        ),
                    )
        finally:
            job_result.end_timestamp = time.time()
            if isinstance(exc_info, (exceptions.JobAborted, asyncio.CancelledError)):
                status = procrastinate_jobs.Status.ABORTED
            elif exc_info:
                status = procrastinate_jobs.Status.FAILED
            else:
                status = procrastinate_jobs.Status.SUCCEEDED
            final_failure = status == procrastinate_jobs.Status.FAILED and not job_retry
            if final_failure or _upstream_logger.isEnabledFor(logging.INFO):  # the level it logs at
                self._log_job_outcome(
                    status=status, context=context, job_result=job_result, job_retry=job_retry, exc_info=exc_info
                )
            if retry_decision is None:
                # No await: nothing here can be cancelled half-way. The result goes with the end.
                self._finish_later(
                    job, status, job_result.result if status == procrastinate_jobs.Status.SUCCEEDED else None
                )
            else:
                persist = asyncio.create_task(
                    self._persist_job_status(
                        job=job, status=status, retry_decision=retry_decision, context=context, job_result=job_result
                    )
                )
                try:
                    await asyncio.shield(persist)
                except asyncio.CancelledError:
                    await persist
                    raise

    def _start(self, job) -> None:
        context = job_context.JobContext(
            app=self.app,
            worker_name=self.worker_name,
            worker_queues=self.queues,
            additional_context=self.additional_context.copy() if self.additional_context else {},
            job=job,
            abort_reason=lambda job_id=job.id: self._job_ids_to_abort.get(job_id) if job_id else None,
            start_timestamp=time.time(),
        )
        task = asyncio.create_task(self._process_job(context), name=f"process job {job.task_name}[{job.id}]")
        self._running_jobs[task] = context

        def on_job_complete(done: asyncio.Task[Any]) -> None:
            del self._running_jobs[done]
            self._jobs_ended += 1
            run_ms = (time.time() - context.start_timestamp) * 1000
            self._run_ms = run_ms if self._run_ms is None else self._run_ms + RUN_TIME_WEIGHT * (run_ms - self._run_ms)
            if self._held and not self._stop_event.is_set():
                self._start(self._held.popleft())  # the slot passes to the next held job
                if not self._held:
                    self._held_emptied.set()
            else:
                self._job_semaphore.release()

        task.add_done_callback(on_job_complete)

    # --- Outliving a database outage ------------------------------------------------------------
    def _database_lost(self, doing: str, exc: BaseException) -> None:
        self._check_own_jobs = True
        if self._database_lost_at is None:
            self._database_lost_at = time.monotonic()
            self.logger.warning("Lost the database while %s (%s); retrying until it is back", doing, _reason(exc))

    def _database_back(self) -> None:
        if self._database_lost_at is not None:
            self.logger.warning("The database is back after %.1f s", time.monotonic() - self._database_lost_at)
            self._database_lost_at = None

    def _known_job_ids(self) -> list[int]:
        manager = self.app.job_manager
        assert isinstance(manager, BatchingJobManager)
        running = [context.job.id for context in self._running_jobs.values() if context.job.id is not None]
        held = [job.id for job in self._held if job.id is not None]
        return running + held + manager.pending_completion_ids()

    async def _requeue_lost_jobs(self) -> bool:
        """After an outage: jobs `doing` under this worker that it neither runs nor has finished
        go back to the queue. True when there were some."""
        manager = self.app.job_manager
        assert isinstance(manager, BatchingJobManager) and self.worker_id is not None
        try:
            requeued, superseded = await manager.requeue_orphans(self.worker_id, keep=self._known_job_ids())
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self._database_lost("checking its jobs", exc)
            return False
        self._check_own_jobs = False
        if requeued:
            self.logger.warning("Re-queued %d job(s) this worker lost track of: %s", len(requeued), requeued)
        for job_id, waiting_id in superseded.items():
            self.logger.warning(
                "Job %s, which this worker lost track of, is superseded by job %s waiting with the same"
                " queueing lock (job %s cancelled)",
                job_id,
                waiting_id,
                job_id,
            )
        return bool(requeued or superseded)

    async def _reregister(self, reason: str) -> None:
        """Register again under a new id (`reason`: the old row is gone) and take back the jobs
        running here, which its deletion left without a worker."""
        manager = self.app.job_manager
        assert isinstance(manager, BatchingJobManager)
        async with self._register_lock:
            old_id = self.worker_id
            if old_id is not None and await manager.heartbeat(old_id):
                return  # another path has re-registered already
            new_id = await manager.register_worker()
            await manager.adopt_jobs(new_id, self._known_job_ids())
            self.worker_id = new_id
            write_worker_id_file(new_id)
            self._check_own_jobs = True
            self.logger.warning("Registered again as worker %s (was %s): %s", new_id, old_id, reason)

    async def _update_heartbeat(self) -> None:
        manager = self.app.job_manager
        assert isinstance(manager, BatchingJobManager)
        backoff = _Backoff()
        delay = self.update_heartbeat_interval
        while True:
            await asyncio.sleep(delay)
            assert self.worker_id is not None
            try:
                if not await manager.heartbeat(self.worker_id):
                    await self._reregister("its row was pruned while it could not reach the database")
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._database_lost("updating its heartbeat", exc)
                # Soon again: a heartbeat older than the stalled timeout gets its jobs rescued.
                delay = min(self.update_heartbeat_interval, backoff.next_delay())
                continue
            backoff.reset()
            delay = self.update_heartbeat_interval

    async def _keep_running(self, name: str, side_task: Callable[[], Awaitable[None]]) -> None:
        """Run a side task again when it fails on a lost database (Procrastinate stops the worker)."""
        backoff = _Backoff()
        while True:
            started = time.monotonic()
            try:
                await side_task()
                return
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._database_lost(f"running its {name}", exc)
            if time.monotonic() - started > 10 * RETRY_MAX_DELAY:
                backoff.reset()  # it had been running fine: this is a new outage
            await asyncio.sleep(backoff.next_delay())
            if name == "listener":
                self._new_job_event.set()  # NOTIFYs sent while it was away are lost: look now

    async def _periodic_deferrer(self) -> None:
        """Procrastinate's, with each cron read on its task's time zone and the database's clock
        (jobs/engine/periodic.py)."""
        deferrer = ZonedPeriodicDeferrer(
            registry=self.app.periodic_registry, connector=self.app.connector, **self.app.periodic_defaults
        )
        return await deferrer.worker()

    def _start_side_tasks(self) -> list[asyncio.Task[Any]]:
        # Procrastinate calls this once the worker has registered: its id is known now.
        assert self.worker_id is not None
        write_worker_id_file(self.worker_id)
        side_tasks = [
            asyncio.create_task(self._update_heartbeat(), name="update_heartbeats"),
            asyncio.create_task(self._keep_running("periodic deferrer", self._periodic_deferrer), name="deferrer"),
            asyncio.create_task(self._poll_jobs_to_abort(), name="poll_jobs_to_abort"),  # survives errors
        ]
        if self.listen_notify:

            def listen() -> Awaitable[None]:
                manager = self.app.job_manager
                return manager.listen_for_jobs(on_notification=self._handle_notification, queues=self.queues)

            side_tasks.append(asyncio.create_task(self._keep_running("listener", listen), name="listener"))
        return side_tasks

    async def _persist_job_status(self, **kwargs: Any) -> None:
        """Write a job's retry (Procrastinate's), waiting for a lost database (up to
        PERSIST_RETRY_SECONDS, or until the worker stops); a job whose retry is never written runs
        again. `_process_job` calls it for retries only: an end goes to the next batch of
        completions (`_finish_later`)."""
        backoff = _Backoff()
        deadline = time.monotonic() + PERSIST_RETRY_SECONDS
        while True:
            try:
                await super()._persist_job_status(**kwargs)
                return
            except Exception as exc:
                if not is_connection_error(exc) or self._stop_event.is_set() or time.monotonic() > deadline:
                    raise
                self._database_lost("recording the end of a job", exc)
            await asyncio.sleep(backoff.next_delay())

    def _finish_later(self, job: procrastinate_jobs.Job, status: procrastinate_jobs.Status, result: Any = None) -> None:
        manager = self.app.job_manager
        assert isinstance(manager, BatchingJobManager) and job.id is not None and self.worker_id is not None
        delete_job = {
            procrastinate_jobs.DeleteJobCondition.ALWAYS: True,
            procrastinate_jobs.DeleteJobCondition.NEVER: False,
            procrastinate_jobs.DeleteJobCondition.SUCCESSFUL: status == procrastinate_jobs.Status.SUCCEEDED,
        }[self.delete_jobs]
        # Its current id, not the job's: a worker that registered again took its jobs along.
        manager.finish_job_later(job, status, worker_id=self.worker_id, delete_job=delete_job, result=result)
        self._job_ids_to_abort.pop(job.id, None)


def write_worker_id_file(worker_id: int) -> None:
    """Record this worker's id in settings.WORKER_ID_FILE (when set), for the container's health
    check (`manage.py jobs_worker_health`). Replaced whole, so a reader never sees half an id."""
    if not settings.WORKER_ID_FILE:
        return
    path = Path(settings.WORKER_ID_FILE)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(f"{worker_id}\n")
    partial.replace(path)


def read_worker_id_file() -> int | None:
    """The id a worker recorded in settings.WORKER_ID_FILE; None when there is none (yet)."""
    try:
        return int(Path(settings.WORKER_ID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _is_missing_worker_row(exc: BaseException) -> bool:
    """A claim refused because this worker's row (procrastinate_workers) is gone."""
    return any(
        isinstance(cause, psycopg.errors.ForeignKeyViolation) and "worker" in (cause.diag.constraint_name or "")
        for cause in utils.causes(exc)
    )


def _reason(exc: BaseException) -> str:
    cause = next((c for c in utils.causes(exc) if isinstance(c, psycopg.Error)), exc)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
