from __future__ import annotations

import json

import pytest
from rest_framework.test import APIClient

from notes.models import Note
from tests.helpers import client_for, jobs

pytestmark = pytest.mark.django_db


def test_token_endpoint_returns_a_token_that_authenticates(user):
    credentials = {"username": "alice", "password": "correct-horse-battery"}
    response = APIClient().post("/api/auth/token/", credentials)
    assert response.status_code == 200
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert client.get("/api/notes/").status_code == 200


def test_anonymous_requests_are_refused():
    assert APIClient().get("/api/notes/").status_code == 401
    assert APIClient().post("/api/notes/", {"content": "x"}, format="json").status_code == 401


def test_create_answers_201_with_tier1_metadata_and_pending_enrichment(api):
    response = api.post(
        "/api/notes/",
        {"title": "Queues", "content": "Read https://example.com/q?a=1 on #Postgres #queues today"},
        format="json",
    )
    assert response.status_code == 201
    body = response.json()
    assert body["enrichment_status"] == "pending"
    assert body["word_count"] == 6
    assert body["tags"] == ["postgres", "queues"]
    assert body["links"] == ["https://example.com/q?a=1"]
    assert body["note_type"] == "link"  # a short text around one link
    note = Note.objects.get(id=body["id"])
    assert note.owner.username == "alice"


def test_create_defers_one_enrichment_job_carrying_only_the_note_id(api):
    content = "secret plans for alice@example.com"
    note_id = api.post("/api/notes/", {"content": content}, format="json").json()["id"]
    [job] = jobs()
    assert job["task_name"] == "notes.enrich"
    assert job["queue_name"] == "enrichment"
    assert job["status"] == "todo"
    assert job["args"] == {"note_id": note_id}
    assert "alice@example.com" not in json.dumps(job, default=str)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "content"),
        ({"content": ""}, "content"),
        ({"content": "   \n "}, "content"),
        ({"content": 123}, "content"),
        ({"content": ["a"]}, "content"),
        ({"content": {"a": 1}}, "content"),
        ({"content": None}, "content"),
        ({"content": "ok", "title": 5}, "title"),
        ({"content": "ok", "title": "t" * 201}, "title"),
        ({"content": "x" * 100_001}, "content"),
        ({"content": "é" * 50_001}, "content"),  # 100,002 bytes in UTF-8
        ({"content": "nul \x00 byte"}, "content"),
    ],
)
def test_bad_input_is_a_400_with_field_errors_and_writes_nothing(api, payload, field):
    response = api.post("/api/notes/", payload, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert Note.objects.count() == 0
    assert jobs() == []


def test_content_at_the_size_limit_is_accepted(api):
    assert api.post("/api/notes/", {"content": "x" * 100_000}, format="json").status_code == 201


@pytest.mark.parametrize("body", ['{"content": "unterminated', "[1, 2", "not json at all", '"just a string"'])
def test_malformed_json_is_a_400_and_writes_nothing(api, body):
    response = api.post("/api/notes/", body, content_type="application/json")
    assert response.status_code == 400
    assert "detail" in response.json() or "non_field_errors" in response.json()
    assert Note.objects.count() == 0
    assert jobs() == []


def test_list_is_paginated_and_filters_by_type_tag_and_text(api):
    api.post("/api/notes/", {"content": "TODO: buy #milk"}, format="json")
    api.post("/api/notes/", {"content": "Why is the sky blue?"}, format="json")
    api.post("/api/notes/", {"content": "Thoughts on #milk chocolate and postgres"}, format="json")

    everything = api.get("/api/notes/").json()
    assert everything["count"] == 3 and len(everything["results"]) == 3
    assert [n["note_type"] for n in api.get("/api/notes/?type=task").json()["results"]] == ["task"]
    assert api.get("/api/notes/?type=question").json()["count"] == 1
    assert api.get("/api/notes/?tag=milk").json()["count"] == 2
    assert api.get("/api/notes/?tag=%23MILK").json()["count"] == 2
    assert api.get("/api/notes/?search=postgres").json()["count"] == 1
    assert api.get("/api/notes/?type=nonsense").status_code == 400


def test_ai_tags_count_for_the_tag_filter(api, user):
    note_id = api.post("/api/notes/", {"content": "plain words"}, format="json").json()["id"]
    Note.objects.filter(id=note_id).update(ai_tags=["databases"])
    assert [n["id"] for n in api.get("/api/notes/?tag=databases").json()["results"]] == [note_id]


def test_users_only_see_and_touch_their_own_notes(api, other_user):
    note_id = api.post("/api/notes/", {"content": "mine"}, format="json").json()["id"]
    intruder = client_for(other_user)
    assert intruder.get("/api/notes/").json()["count"] == 0
    assert intruder.get(f"/api/notes/{note_id}/").status_code == 404
    assert intruder.patch(f"/api/notes/{note_id}/", {"content": "hacked"}, format="json").status_code == 404
    assert intruder.delete(f"/api/notes/{note_id}/").status_code == 404
    assert Note.objects.get(id=note_id).content == "mine"


def test_patch_content_recomputes_tier1_and_requeues_enrichment(api):
    note_id = api.post("/api/notes/", {"content": "first #one"}, format="json").json()["id"]
    Note.objects.filter(id=note_id).update(enrichment_status="done")
    with_job_done = jobs()[0]["id"]
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'succeeded' WHERE id = %s", [with_job_done])

    response = api.patch(f"/api/notes/{note_id}/", {"content": "second #two words"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["tags"] == ["two"] and body["word_count"] == 3
    assert body["enrichment_status"] == "pending"
    waiting = [j for j in jobs() if j["status"] == "todo"]
    assert len(waiting) == 1 and waiting[0]["args"] == {"note_id": note_id}


def test_two_quick_edits_leave_one_waiting_enrichment_job(api):
    note_id = api.post("/api/notes/", {"content": "v1"}, format="json").json()["id"]
    api.patch(f"/api/notes/{note_id}/", {"content": "v2"}, format="json")
    api.patch(f"/api/notes/{note_id}/", {"content": "v3"}, format="json")
    waiting = [j for j in jobs() if j["status"] == "todo"]
    assert len(waiting) == 1
    assert waiting[0]["queueing_lock"] == f"note-enrich:{note_id}"
    assert waiting[0]["lock"] == f"note:{note_id}"
    assert Note.objects.get(id=note_id).content_version == 3


def test_title_only_edit_does_not_requeue(api):
    note_id = api.post("/api/notes/", {"content": "body"}, format="json").json()["id"]
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'succeeded'")
    assert api.patch(f"/api/notes/{note_id}/", {"title": "New title"}, format="json").status_code == 200
    assert [j for j in jobs() if j["status"] == "todo"] == []


def test_put_requires_content_and_bad_patch_changes_nothing(api):
    note_id = api.post("/api/notes/", {"content": "body"}, format="json").json()["id"]
    assert api.put(f"/api/notes/{note_id}/", {"title": "t"}, format="json").status_code == 400
    assert api.patch(f"/api/notes/{note_id}/", {"content": ""}, format="json").status_code == 400
    assert Note.objects.get(id=note_id).content == "body"


def test_delete_removes_the_note(api):
    note_id = api.post("/api/notes/", {"content": "bye"}, format="json").json()["id"]
    assert api.delete(f"/api/notes/{note_id}/").status_code == 204
    assert api.get(f"/api/notes/{note_id}/").status_code == 404
