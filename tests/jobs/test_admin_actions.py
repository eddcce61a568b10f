from __future__ import annotations

import pytest

from jobs.models import PausedQueue
from tests.factories import make_user
from tests.helpers import jobs
from tests.jobs.test_dashboard import client_of, make_job, staff

pytestmark = pytest.mark.django_db

JOBS = "/admin/procrastinate/procrastinatejob/"
QUEUES = "/admin/jobs/pausedqueue/"


def offered_actions(client) -> set[str]:
    response = client.get(JOBS)
    assert response.status_code == 200
    form = response.context["action_form"]  # None when no action is offered
    return {name for name, _ in form.fields["action"].choices if name} if form is not None else set()


def status_of(job_id: int) -> str:
    return {job["id"]: job["status"] for job in jobs()}[job_id]


def test_superuser_gets_every_action_and_plain_staff_none():
    assert offered_actions(client_of(staff("root", superuser=True))) == {"retry", "cancel", "abort"}
    viewer = staff("viewer")
    viewer.user_permissions.add(*_procrastinate_view_permissions())  # may open the job list, no more
    assert offered_actions(client_of(viewer)) == set()


def test_retry_permission_offers_and_runs_only_retry():
    user = staff("retrier", "retry_job")
    user.user_permissions.add(*_procrastinate_view_permissions())
    client = client_of(user)
    assert offered_actions(client) == {"retry"}
    failed = make_job("notifications.deliver", "notifications", "failed")
    waiting = make_job("notes.enrich", "enrichment")

    response = client.post(JOBS, {"action": "retry", "_selected_action": [failed]})
    assert response.status_code == 302 and status_of(failed) == "todo"

    # Cancel is not offered, so a forged POST of it does nothing.
    client.post(JOBS, {"action": "cancel", "_selected_action": [waiting]})
    assert status_of(waiting) == "todo"


def test_cancel_permission_offers_cancel_and_abort():
    user = staff("canceller", "cancel_job")
    user.user_permissions.add(*_procrastinate_view_permissions())
    client = client_of(user)
    assert offered_actions(client) == {"cancel", "abort"}
    waiting = make_job("notes.enrich", "enrichment")
    failed = make_job("notifications.deliver", "notifications", "failed")
    client.post(JOBS, {"action": "cancel", "_selected_action": [waiting]})
    assert status_of(waiting) == "cancelled"
    client.post(JOBS, {"action": "retry", "_selected_action": [failed]})
    assert status_of(failed) == "failed"


def test_queues_page_lists_every_queue_with_counts_and_state():
    make_job("imports.run", "imports")
    PausedQueue.objects.create(queue_name="digests")
    client = client_of(staff("root", superuser=True))
    response = client.get(QUEUES)
    assert response.status_code == 200
    rows = {q["name"]: q for q in response.context["queues"]}
    assert set(rows) >= {"enrichment", "notifications", "digests", "imports", "maintenance"}
    assert rows["imports"]["counts"]["todo"] == 1 and rows["digests"]["paused"]
    page = response.content.decode()
    assert 'value="resume"' in page and 'value="pause"' in page
    assert "/admin/jobs/dashboard/" in page


def test_queues_page_hides_buttons_and_refuses_pause_without_the_permission():
    client = client_of(staff("watcher", "view_pausedqueue"))
    page = client.get(QUEUES).content.decode()
    assert 'data-queue="imports"' in page and 'value="pause"' not in page
    assert client.post(QUEUES, {"action": "pause", "queue": "imports"}).status_code == 403
    assert not PausedQueue.objects.exists()


def test_queues_page_pauses_and_resumes_with_the_permission():
    client = client_of(staff("pauser", "pause_queue"))
    response = client.post(QUEUES, {"action": "pause", "queue": "imports"}, follow=True)
    assert PausedQueue.objects.get(queue_name="imports").paused_by.username == "pauser"
    assert "Queue imports paused" in response.content.decode()
    client.post(QUEUES, {"action": "resume", "queue": "imports"})
    assert not PausedQueue.objects.exists()


def test_queues_page_reports_an_unknown_queue():
    client = client_of(staff("typo", "pause_queue"))
    response = client.post(QUEUES, {"action": "pause", "queue": "nope"}, follow=True)
    assert "Must be one of" in response.content.decode()
    assert not PausedQueue.objects.exists()


def test_non_staff_cannot_open_the_queues_page(client):
    client.force_login(make_user("outsider"))
    assert client.get(QUEUES).status_code == 302


def test_jobs_admin_page_links_to_the_dashboard():
    client = client_of(staff("root", superuser=True))
    assert "/admin/jobs/dashboard/" in client.get("/admin/jobs/").content.decode()


def _procrastinate_view_permissions():
    from django.contrib.auth.models import Permission

    return Permission.objects.filter(content_type__app_label="procrastinate", codename__startswith="view_")
