"""The worker's event loop (JOBS_EVENT_LOOP, config/startup.py): uvloop unless told otherwise."""

from __future__ import annotations

import pytest

from jobs.models import JobInfo
from jobs.tasking.defer import job_defer
from tests.helpers import stop_worker, wait_for
from tests.jobs import tasks_for_tests as tasks
from tests.jobs.workers import job_status, start_test_worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(("choice", "module"), [(None, "uvloop"), ("asyncio", "asyncio.unix_events")])
def test_the_worker_runs_its_jobs_on_the_configured_event_loop(choice, module):
    job_id = job_defer(tasks.event_loop_module)
    worker = start_test_worker("--queues", tasks.QUEUE_A, env={"JOBS_EVENT_LOOP": choice} if choice else {})
    try:
        wait_for(lambda: job_status(job_id) == "succeeded", timeout=60, what="the job")
    finally:
        output = stop_worker(worker)
    assert JobInfo.objects.get(job_id=job_id).result == {"loop": module}, output
