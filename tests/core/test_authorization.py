"""The authorization matrix: every API operation, and every other page, for an anonymous
client, another user, non-staff and staff.

The operations come from the OpenAPI schema, and the test first checks that the schema holds
every route the URL resolver has under /api/. Each operation must be listed in exactly one
class below: a new endpoint fails this test until someone decides who may call it.

- anonymous: 401 with `WWW-Authenticate: Token` everywhere except the public operations.
- another user's object: 404, exactly as for an id that does not exist; the owner, making the
  same request, gets past the lookup (positive control). Lists show another user nothing.
- staff-only operations: 403 for a signed-in user who is not staff (or lacks the permission).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from digests.models import WeeklyDigest
from jobs.models import JobBatch
from tests.factories import make_recipient, make_user
from tests.helpers import client_for

PUBLIC = {
    "GET /api/health/",
    "POST /api/auth/token/",
    "GET /api/schema/",
}
# Operations on one object (its id in the path), with the request that the owner may make.
OWNED: dict[str, dict] = {
    "GET /api/notes/{id}/": {"object": "note"},
    "PUT /api/notes/{id}/": {"object": "note", "body": {"content": "changed"}},
    "PATCH /api/notes/{id}/": {"object": "note", "body": {"title": "changed"}},
    "DELETE /api/notes/{id}/": {"object": "note"},
    "GET /api/notes/import/{import_id}/": {"object": "import"},
    "GET /api/recipients/{id}/": {"object": "recipient"},
    "PUT /api/recipients/{id}/": {"object": "recipient", "body": {"name": "Rita", "email": "rita@example.com"}},
    "PATCH /api/recipients/{id}/": {"object": "recipient", "body": {"name": "Rita B."}},
    "DELETE /api/recipients/{id}/": {"object": "recipient"},
    "GET /api/digest-schedules/{id}/": {"object": "schedule"},
    "PUT /api/digest-schedules/{id}/": {"object": "schedule", "body": "schedule"},
    "PATCH /api/digest-schedules/{id}/": {"object": "schedule", "body": {"active": False}},
    "DELETE /api/digest-schedules/{id}/": {"object": "schedule"},
    "GET /api/digests/{id}/": {"object": "digest"},
    "GET /api/notifications/jobs/{id}/": {"object": "notification"},
    "DELETE /api/notifications/jobs/{id}/": {"object": "notification"},
    "POST /api/notifications/jobs/{id}/retry/": {"object": "notification"},
    "GET /api/jobs/{id}/": {"object": "job"},
    "DELETE /api/jobs/{id}/": {"object": "job"},
    "POST /api/jobs/{id}/retry/": {"object": "job"},
    "GET /api/jobs/{id}/stream/": {"object": "job"},
    "GET /api/jobs/batches/{id}/": {"object": "batch"},
    "POST /api/jobs/batches/{id}/cancel/": {"object": "batch"},
    "POST /api/jobs/batches/{id}/retry/": {"object": "batch"},
    "GET /api/jobs/batches/{id}/stream/": {"object": "batch"},
}
# Lists and metrics: scoped to the caller, so another user's objects never show.
LISTS = {
    "GET /api/notes/",
    "GET /api/recipients/",
    "GET /api/digest-schedules/",
    "GET /api/digests/",
    "GET /api/notifications/jobs/",
    "GET /api/jobs/",
    "GET /api/jobs/batches/",
    "GET /api/jobs/metrics/",
    "GET /api/notifications/metrics/",
}
# Creating: the new object is the caller's; objects named in the body must be the caller's.
CREATES: dict[str, Callable[[dict], dict] | None] = {
    "POST /api/notes/": None,
    "POST /api/recipients/": None,
    "POST /api/notes/import/": None,
    "POST /api/notifications/send-email/": lambda o: {"recipient_id": o["recipient"], "subject": "s", "body": "b"},
    "POST /api/notifications/send-bulk/": lambda o: {"recipient_ids": [o["recipient"]], "subject": "s", "body": "b"},
    "POST /api/digest-schedules/": lambda o: {
        "recipient_id": o["recipient"],
        "frequency": "daily",
        "delivery_time": "8:00",
    },
}
# The caller's own settings, no id in the path: each user reaches only theirs
# (tests/jobs/test_webhooks.py::test_each_owner_signs_with_a_secret_of_their_own).
OWN_SETTINGS = {
    "POST /api/auth/erase/",
    "GET /api/webhooks/secret/",
    "POST /api/webhooks/secret/rotate/",
}
STAFF_ONLY = {
    "GET /api/jobs/queues/": None,
    "POST /api/jobs/queues/{name}/pause/": "jobs.pause_queue",
    "POST /api/jobs/queues/{name}/resume/": "jobs.pause_queue",
}


def _schema_operations() -> dict[str, dict]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return {
        f"{method.upper()} {path}": operation
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    }


def _api_routes(patterns=None, prefix: str = "") -> set[str]:
    """Every route of the URL resolver under /api/, as an OpenAPI path template."""
    routes = set()
    for pattern in patterns if patterns is not None else get_resolver().url_patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            routes |= _api_routes(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern) and route.startswith(("api/", "^api/")):
            # "<int:pk>" and the routers' "(?P<pk>[^/.]+)" both become "{id}", as in the schema.
            path = re.sub(r"<(?:\w+:)?(\w+)>|\(\?P<(\w+)>[^)]*\)", lambda m: "{%s}" % (m[1] or m[2]), route)
            path = "/" + path.replace("^", "").replace("$", "").replace("\\.", ".").replace("{pk}", "{id}")
            if "{format}" not in path and not path.endswith(".json"):  # DRF's format suffixes
                routes.add(path)
    return routes


def test_every_api_route_is_in_the_schema_and_classified():
    operations = _schema_operations()
    paths = {label.split(" ", 1)[1] for label in operations}
    missing = _api_routes() - paths - {"/api/docs/"}  # the docs page is HTML around the schema
    assert not missing, f"routes missing from the OpenAPI schema: {missing}"

    classes = [PUBLIC, set(OWNED), LISTS, set(CREATES), OWN_SETTINGS, set(STAFF_ONLY)]
    classified = set().union(*classes)
    assert sum(len(c) for c in classes) == len(classified), "an operation is in two classes"
    assert set(operations) == classified, (
        f"unclassified: {sorted(set(operations) - classified)}; gone: {sorted(classified - set(operations))}"
    )
    # The schema says the same thing about who may call what.
    for label, operation in operations.items():
        anonymous_allowed = {} in operation.get("security", [])
        assert anonymous_allowed == (label in PUBLIC), label


def _request(client: APIClient, label: str, path_values: dict | None = None, body=None):
    method, path = label.split(" ", 1)
    for name, value in (path_values or {}).items():
        path = path.replace(f"{{{name}}}", str(value))
    path = re.sub(r"\{\w+\}", "1", path)
    send = getattr(client, method.lower())
    return send(path, body, format="json") if body is not None else send(path)


@pytest.mark.django_db
@pytest.mark.parametrize("label", sorted(set(OWNED) | LISTS | set(CREATES) | OWN_SETTINGS | set(STAFF_ONLY)))
def test_anonymous_gets_401(label):
    response = _request(APIClient(), label, {"name": "imports"}, body={})
    assert response.status_code == 401, response.content
    assert response["WWW-Authenticate"] == "Token"
    assert set(response.json()) == {"detail"}


@pytest.mark.django_db
def test_a_wrong_token_is_a_401_too():
    response = APIClient().get("/api/notes/", HTTP_AUTHORIZATION="Token not-a-real-token")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


@pytest.mark.django_db
@pytest.mark.parametrize("label", sorted(PUBLIC))
def test_public_operations_answer_anonymous_clients(label):
    body = {"username": "nobody", "password": "wrong"} if label.startswith("POST") else None
    response = _request(APIClient(), label, body=body)
    assert response.status_code in (200, 400, 503), response.content  # 400: wrong password; 503: no worker


def _objects_of(owner) -> dict[str, int]:
    """One fresh object of every kind, owned by `owner`, made through the API as they would be."""
    api = client_for(owner)
    recipient = make_recipient(owner)
    note = api.post("/api/notes/", {"content": "Owner's note"}, format="json")
    sent = api.post(
        "/api/notifications/send-email/", {"recipient_id": recipient.id, "subject": "s", "body": "b"}, format="json"
    )
    schedule = api.post(
        "/api/digest-schedules/",
        {"recipient_id": recipient.id, "frequency": "daily", "delivery_time": "08:00"},
        format="json",
    )
    upload = SimpleUploadedFile("notes.csv", b"content\nA row\n", content_type="text/csv")
    note_import = api.post("/api/notes/import/", {"file": upload}, format="multipart")
    now = timezone.now()
    digest = WeeklyDigest.objects.create(owner=owner, period_start=now - timedelta(days=7), period_end=now, content="d")
    return {
        "recipient": recipient.id,
        "note": note.json()["id"],
        "notification": sent.json()["job_id"],
        "schedule": schedule.json()["id"],
        "import": note_import.json()["import_id"],
        "job": note_import.json()["job_id"],
        "digest": digest.id,
        "batch": JobBatch.objects.get(owner=owner).id,  # the import's enrichment
    }


def _owned_body(spec: dict, objects: dict):
    if spec.get("body") == "schedule":
        return {"recipient_id": objects["recipient"], "frequency": "weekly", "delivery_day": 1, "delivery_time": "9:00"}
    return spec.get("body")


@pytest.mark.django_db
@pytest.mark.parametrize("label", sorted(OWNED))
def test_another_users_object_is_a_404_and_the_owner_gets_past_the_lookup(label, user, other_user):
    spec = OWNED[label]
    objects = _objects_of(other_user)
    name = "import_id" if "{import_id}" in label else "id"
    path_values = {name: objects[spec["object"]]}
    body = _owned_body(spec, objects)

    response = _request(client_for(user), label, path_values, body)
    assert response.status_code == 404, response.content
    assert set(response.json()) == {"detail"}
    # Exactly as for an object that does not exist: nothing tells the two apart.
    missing = _request(client_for(user), label, {name: 10**9}, body)
    assert (missing.status_code, missing.json()) == (response.status_code, response.json())

    owner = _request(client_for(other_user), label, path_values, body)
    assert owner.status_code in (200, 202, 204, 409), owner.content
    owner.close()  # the event stream's generator, never started


@pytest.mark.django_db
@pytest.mark.parametrize("label", sorted(LISTS))
def test_lists_and_metrics_show_nothing_of_another_user(label, user, other_user):
    objects = _objects_of(other_user)
    response = _request(client_for(user), label)
    assert response.status_code == 200, response.content
    body = response.json()
    if "results" in body:
        assert body["count"] == 0, body
    else:
        text = str(body)
        assert "Owner's note" not in text
        if label == "GET /api/jobs/metrics/":
            assert not body["counts"] and not body["tasks"], body
        else:
            assert body["by_status"] == {} or sum(body["by_status"].values()) == 0, body
    assert objects  # the other user's objects exist


@pytest.mark.django_db
@pytest.mark.parametrize("label", sorted(label for label, body in CREATES.items() if body))
def test_objects_named_in_a_body_must_be_the_callers(label, user, other_user):
    objects = _objects_of(other_user)
    response = _request(client_for(user), label, body=CREATES[label](objects))
    assert response.status_code == 400, response.content
    assert "recipient_id" in response.json() or "recipient_ids" in response.json()
    # The owner may.
    owner = _request(client_for(other_user), label, body=CREATES[label](objects))
    assert owner.status_code in (201, 202), owner.content


@pytest.mark.django_db
@pytest.mark.parametrize("label", sorted(STAFF_ONLY))
def test_staff_only_operations_refuse_non_staff(label, user):
    response = _request(client_for(user), label, {"name": "imports"})
    assert response.status_code == 403, response.content

    permission = STAFF_ONLY[label]
    staff = make_user("staff", is_staff=True)
    response = _request(client_for(staff), label, {"name": "imports"})
    assert response.status_code == (403 if permission else 200), response.content
    if permission:
        app_label, codename = permission.split(".")
        staff.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
        staff = type(staff).objects.get(pk=staff.pk)  # forget the cached permissions
        response = _request(client_for(staff), label, {"name": "imports"})
        assert response.status_code == 200, response.content


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("label", "permission"), [("DELETE /api/jobs/{id}/", "cancel_job"), ("POST /api/jobs/{id}/retry/", "retry_job")]
)
def test_staff_see_every_job_but_need_the_permission_to_act_on_another_users(label, permission, user, other_user):
    objects = _objects_of(other_user)
    staff = make_user("staff", is_staff=True)
    # Existence is public to staff (they list every job), so the refusal is a 403, not a 404.
    assert client_for(staff).get(f"/api/jobs/{objects['job']}/").status_code == 200
    response = _request(client_for(staff), label, {"id": objects["job"]})
    assert response.status_code == 403, response.content
    staff.user_permissions.add(Permission.objects.get(content_type__app_label="jobs", codename=permission))
    staff = type(staff).objects.get(pk=staff.pk)
    response = _request(client_for(staff), label, {"id": objects["job"]})
    assert response.status_code in (204, 409), response.content  # allowed; a todo job is not retryable


# --- Pages outside the API -------------------------------------------------------------------

DASHBOARD_PAGES = ["/admin/jobs/dashboard/", "/admin/jobs/dashboard/data/"]
DASHBOARD_ACTIONS = [
    "/admin/jobs/dashboard/retry-failed/",
    "/admin/jobs/dashboard/pause/",
    "/admin/jobs/dashboard/resume/",
    "/admin/jobs/dashboard/batch-cancel/",
    "/admin/jobs/dashboard/batch-retry/",
]


def test_every_page_outside_the_api_is_covered():
    routes = set()

    def walk(patterns, prefix=""):
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                if route != "admin/":  # Django's own admin, covered by Django
                    walk(pattern.url_patterns, route)
            elif not route.startswith("api/"):
                routes.add("/" + route)

    walk(get_resolver().url_patterns)
    assert routes == {*DASHBOARD_PAGES, *DASHBOARD_ACTIONS, "/metrics"}


@pytest.mark.django_db
@pytest.mark.parametrize("path", DASHBOARD_PAGES)
def test_dashboard_pages_need_staff(client, user, path):
    assert client.get(path).status_code == 302  # to the admin's login
    client.force_login(user)
    assert client.get(path).status_code == 302
    client.force_login(make_user("staff", is_staff=True))
    assert client.get(path).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("path", DASHBOARD_ACTIONS)
def test_dashboard_actions_need_staff_with_the_permission(client, user, path):
    body = {"task": "notes.enrich", "queue": "imports", "batch": 1}
    assert client.post(path, body, content_type="application/json").status_code == 403
    client.force_login(user)
    assert client.post(path, body, content_type="application/json").status_code == 403
    client.force_login(make_user("staff", is_staff=True))
    assert client.post(path, body, content_type="application/json").status_code == 403
    client.force_login(make_user("root", is_staff=True, is_superuser=True))
    assert client.post(path, body, content_type="application/json").status_code == 200


@pytest.mark.django_db
def test_metrics_need_the_bearer_token_when_one_is_set(client, settings):
    settings.METRICS_TOKEN = "scrape-secret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret").status_code == 200
