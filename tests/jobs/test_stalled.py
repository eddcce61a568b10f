"""A worker killed with SIGKILL mid-job: its job is rescued and finished by another worker."""

from __future__ import annotations

import signal
import threading

import pytest

from notes import services
from notes.models import Note
from tests.conftest import jobs, start_worker_process, wait_for
from tests.factories import make_user

pytestmark = pytest.mark.django_db(transaction=True)


def test_job_of_a_sigkilled_worker_is_retried_and_completed_by_another_worker(claude):
    note = services.note_create(owner=make_user("dave"), content="survives a crash")
    release = threading.Event()
    claude.hang(release)  # the first worker's Claude call never returns
    env = {
        "ANTHROPIC_API_KEY": "sk-ant-test-key",
        "ANTHROPIC_BASE_URL": claude.base_url,
        "WORKER_HEARTBEAT_SECONDS": "0.5",
        "WORKER_STALLED_SECONDS": "2",
        "STALLED_JOBS_CRON": "* * * * * */1",  # every second
    }

    doomed = start_worker_process("--queues", "enrichment", env=env)
    try:
        assert claude.request_started.wait(30), "the first worker never called Claude"
        [job] = jobs("notes.enrich")
        assert job["status"] == "doing"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    finally:
        release.set()
        if doomed.poll() is None:
            doomed.kill()
    assert jobs("notes.enrich")[0]["status"] == "doing"  # nobody told the database

    rescuer = start_worker_process("--queues", "enrichment,maintenance", env=env)
    try:
        wait_for(
            lambda: Note.objects.get(id=note.id).enrichment_status == "done",
            timeout=30,
            what="the rescued job to complete",
        )
    finally:
        rescuer.send_signal(signal.SIGTERM)
        output = rescuer.communicate(timeout=20)[0]
    [job] = jobs("notes.enrich")
    assert job["status"] == "succeeded", output
    assert job["attempts"] >= 1
    assert len(claude.message_requests) == 2
    assert any(j["status"] == "succeeded" for j in jobs("jobs.retry_stalled"))
