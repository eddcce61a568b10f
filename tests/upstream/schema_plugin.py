"""pytest plugin for the upstream suite: the template database Procrastinate's conftest builds
(fixture `setup_db`), and the one pytest-django migrates for the Django tests, also get our
engine's schema (the `jobs` app's migrations: paused queues, job info, statement-level
triggers, the claim's helper function), as `manage.py migrate` gives a real deployment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MIGRATE = """
import django
from django.conf import settings
settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": sys.argv[1]}},
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "procrastinate.contrib.django", "jobs"],
    USE_TZ=True,
    PROCRASTINATE_AUTODISCOVER_MODULE_NAME="no_tasks_module",  # jobs/tasks.py needs our settings
    BASE_DIR=sys.argv[2],  # the boundary check at start-up (jobs/apps.py) looks for our subclasses there
)
django.setup()
from django.core.management import call_command
call_command("migrate", "procrastinate", fake=True, verbosity=0)  # the schema is already there
call_command("migrate", "jobs", verbosity=0)
# Procrastinate's Django test project does not know the `jobs` app, so its flush between tests
# truncates auth_user alone: the engine's tables must not hold foreign keys to it here.
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute('''
        DO $$ DECLARE fk record; BEGIN
            FOR fk IN SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
                       WHERE contype = 'f' AND confrelid = 'auth_user'::regclass
                         AND conrelid::regclass::text LIKE 'jobs%%' LOOP
                EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.tbl, fk.conname);
            END LOOP;
        END $$;
    ''')
"""


def _migrate_engine_schema(dbname: str) -> None:
    repo = os.environ["SECONDBRAIN_ENGINE_REPO"]
    env = {**os.environ, "PYTHONPATH": repo}  # plain Django here: its `jobs` app from the repo
    env.pop("SECONDBRAIN_ENGINE_REPO")
    subprocess.run([sys.executable, "-c", "import sys\n" + MIGRATE, dbname, repo], env=env, check=True)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    result = yield
    if fixturedef.argname == "setup_db":  # the template of every database of the suite
        _migrate_engine_schema(result)
    elif fixturedef.argname == "django_db_setup":  # pytest-django's own, built by migrations
        from django.db import connection

        _migrate_engine_schema(connection.settings_dict["NAME"])
    return result
