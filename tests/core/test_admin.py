from __future__ import annotations

import pytest
from django.db import connection

from notes import services
from tests.factories import make_user
from tests.helpers import jobs

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    admin = make_user("root", is_staff=True, is_superuser=True)
    client.force_login(admin)
    return client


@pytest.mark.parametrize(
    "path",
    [
        "/admin/procrastinate/procrastinatejob/",
        "/admin/procrastinate/procrastinateevent/",
        "/admin/procrastinate/procrastinateworker/",
        "/admin/notes/note/",
        "/admin/llm/llmusage/",
    ],
)
def test_admin_lists_jobs_events_workers_and_project_models(staff_client, path):
    services.note_create(owner=make_user("ivy"), content="visible in the admin")
    assert staff_client.get(path).status_code == 200


def test_admin_shows_a_job_and_offers_retry_and_cancel(staff_client):
    services.note_create(owner=make_user("jack"), content="x")
    [job] = jobs("notes.enrich")
    page = staff_client.get("/admin/procrastinate/procrastinatejob/").content.decode()
    assert 'value="retry"' in page and 'value="cancel"' in page
    assert staff_client.get(f"/admin/procrastinate/procrastinatejob/{job['id']}/change/").status_code == 200


def test_admin_retry_action_requeues_a_failed_job(staff_client):
    services.note_create(owner=make_user("kim"), content="x")
    [job] = jobs("notes.enrich")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'failed', attempts = 4 WHERE id = %s", [job["id"]])
    response = staff_client.post(
        "/admin/procrastinate/procrastinatejob/",
        {"action": "retry", "_selected_action": [job["id"]]},
    )
    assert response.status_code == 302
    assert jobs("notes.enrich")[0]["status"] == "todo"


def test_admin_cancel_action_cancels_a_waiting_job(staff_client):
    services.note_create(owner=make_user("lee"), content="x")
    [job] = jobs("notes.enrich")
    staff_client.post("/admin/procrastinate/procrastinatejob/", {"action": "cancel", "_selected_action": [job["id"]]})
    assert jobs("notes.enrich")[0]["status"] == "cancelled"


def test_non_staff_cannot_open_the_admin(client):
    client.force_login(make_user("nobody"))
    assert client.get("/admin/procrastinate/procrastinatejob/").status_code == 302
