"""Procrastinate's worker, taking as many jobs per query as it has free slots.

Stock Procrastinate fetches one job per query, then waits for that round trip before it can
fetch the next: with short jobs the worker spends its time waiting on the database. Here a
fetch takes every free slot at once (`BatchingJobManager.fetch_jobs`), so a worker at
concurrency 10 makes one claim for up to 10 jobs. It never claims more jobs than it can start
at once, so a claimed job is never left waiting behind a long one while another worker idles.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from procrastinate import job_context, types, utils
from procrastinate.worker import Worker

from jobs.manager import BatchingJobManager


class BatchingWorker(Worker):
    async def run(self) -> None:
        # Sync tasks run in the loop's default executor, which Python sizes by CPU count (6
        # threads on 2 cores): give it a thread per job slot, or sync jobs queue for threads,
        # and as many again for runs abandoned at a time limit or an abort, which keep theirs
        # until they return. Threads are only started when needed.
        loop = asyncio.get_running_loop()
        threads = 2 * self.concurrency + 4
        loop.set_default_executor(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="job"))
        await super().run()

    def _log_extra(self, action: str, context, job_result, **kwargs: Any) -> types.JSONDict:
        # Procrastinate builds this dict (with a copy of the whole job) for every log call of
        # every job, even when nothing is logged: only build it when INFO is on.
        if not self.logger.isEnabledFor(logging.INFO):
            return {"action": action}
        return super()._log_extra(action, context, job_result, **kwargs)

    async def _fetch_and_process_jobs(self) -> None:
        """Fetch and process jobs until there is none left or the worker is asked to stop
        (Procrastinate's loop, with a batch of claims per query)."""
        manager = self.app.job_manager
        assert isinstance(manager, BatchingJobManager)
        while not self._stop_event.is_set():
            acquire = asyncio.create_task(self._job_semaphore.acquire())
            await utils.wait_any(acquire, self._stop_event.wait())
            if not acquire.done() or self._stop_event.is_set():
                if acquire.done():
                    self._job_semaphore.release()
                break
            await asyncio.sleep(0)  # let jobs finishing right now free their slots too
            slots = 1
            while slots < self.concurrency and not self._job_semaphore.locked():
                await self._job_semaphore.acquire()  # free: returns at once
                slots += 1
            jobs = []
            try:
                assert self.worker_id is not None
                jobs = await manager.fetch_jobs(queues=self.queues, worker_id=self.worker_id, limit=slots)
            finally:
                for _ in range(slots - len(jobs)):
                    self._job_semaphore.release()
                self._new_job_event.clear()
            if not jobs:
                break  # the queue is empty for now: wait for a NOTIFY or the next poll
            for job in jobs:
                self._start(job)

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
            self._job_semaphore.release()

        task.add_done_callback(on_job_complete)
