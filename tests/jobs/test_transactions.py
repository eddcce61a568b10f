"""A job is deferred in the same transaction as the rows it refers to."""

from __future__ import annotations

import psycopg
import pytest
from django.db import transaction

from notes import services
from notes.models import Note
from tests.factories import make_user
from tests.helpers import database_url, jobs

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_rolled_back_write_leaves_no_job():
    owner = make_user("erin")
    with pytest.raises(RuntimeError), transaction.atomic():
        services.note_create(owner=owner, content="never happened")
        assert len(jobs("notes.enrich")) == 1  # visible inside the transaction...
        raise RuntimeError("the request failed after the write")
    assert Note.objects.count() == 0
    assert jobs("notes.enrich") == []  # ...and gone with it


def test_a_committed_write_always_has_its_job():
    owner = make_user("frank")
    note = services.note_create(owner=owner, content="committed")
    # Seen from another connection: both the row and its job were committed together.
    with psycopg.connect(database_url()) as other:
        [(args,)] = other.execute(
            "SELECT j.args FROM procrastinate_jobs j JOIN notes n ON n.id = (j.args->>'note_id')::bigint"
            " WHERE j.task_name = 'notes.enrich'"
        ).fetchall()
    assert args == {"note_id": note.id}


def test_a_job_is_invisible_to_workers_until_its_transaction_commits():
    owner = make_user("grace")
    with transaction.atomic():
        note = services.note_create(owner=owner, content="in flight")
        with psycopg.connect(database_url()) as other:
            assert other.execute("SELECT count(*) FROM procrastinate_jobs").fetchone() == (0,)
    with psycopg.connect(database_url()) as other:
        assert other.execute("SELECT args FROM procrastinate_jobs").fetchall() == [({"note_id": note.id},)]


def test_a_defer_repeated_on_one_connection_is_planned_once():
    # Server-side binding with psycopg's prepare_threshold (config/settings.py): from its fifth
    # run a statement is prepared, so PostgreSQL stops parsing and planning it on every call
    # (a third of a defer's time). Client-side binding, Django's default, never prepares.
    from django.db import connection

    from jobs.tasking.defer import job_defer
    from tests.jobs.tasks_for_tests import later

    for _ in range(6):
        job_defer(later)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%%INSERT INTO procrastinate_jobs%%'"
        )
        [(prepared,)] = cursor.fetchall()
    assert prepared == 1
    assert len(jobs(later.name)) == 6
