"""Contract tests: what the engine copies or replaces of Procrastinate is still what Procrastinate
ships at the pinned version (jobs/engine/boundary.py holds the fingerprints).

- The SQL functions whose rules the engine's SQL copies (the claim, the batch of ends, the
  retry, the insert, the triggers it replaces): sha256 of each one's definition (arguments,
  result, language and body, as pg_get_functiondef() prints them), as
  Procrastinate's own migrations create them, in a scratch database that only they ran on.
- The triggers on procrastinate_jobs as those migrations leave them; migration 0003 drops three
  and replaces them, so a new one upstream (which would double the events) must be read.
- The Python methods the engine replaces wholesale: sha256 of their source.

Each mismatch names the file to revisit. The `..._notices_...` tests alter one of each and show
the comparison fails with that line.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Iterator

import psycopg
import pytest
from django.db import connection
from django.db.migrations.loader import MigrationLoader
from procrastinate.worker import Worker

from jobs.engine import boundary

BOUNDARY = "jobs/engine/boundary.py"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _procrastinate_migrations_sql() -> Iterator[str]:
    """The SQL of Procrastinate's Django migrations, in the order `migrate` applies them."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    [leaf] = loader.graph.leaf_nodes("procrastinate")
    for key in loader.graph.forwards_plan(leaf):
        if key[0] != "procrastinate":
            continue
        for operation in loader.graph.nodes[key].operations:
            sql = getattr(operation, "sql", None)
            if sql:  # the others are state-only (Procrastinate's models are unmanaged)
                yield sql


def _server_params() -> dict:
    db = connection.settings_dict
    return {
        "host": db["HOST"] or "127.0.0.1",
        "port": db["PORT"] or 5432,
        "user": db["USER"],
        "password": db["PASSWORD"] or None,
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[psycopg.Connection]:
    """A scratch database where only Procrastinate's migrations ran (ours drop its triggers)."""
    name = f"upstream_contract_{os.getpid()}"
    with psycopg.connect(**_server_params(), dbname="postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(**_server_params(), dbname=name, autocommit=True) as conn:
            for sql in _procrastinate_migrations_sql():
                with conn.transaction():
                    conn.execute(sql)
            yield conn
    finally:
        with psycopg.connect(**_server_params(), dbname="postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def _function_fingerprints(cursor) -> dict[str, str]:
    # What pg_get_functiondef() prints, but from its parts: the body as written and the header as
    # PostgreSQL names it, so that another server version's layout of the header does not count.
    cursor.execute(
        "SELECT p.proname, concat_ws(E'\\n', pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid),"
        " l.lanname, p.prosrc) FROM pg_proc AS p"
        " JOIN pg_namespace AS n ON n.oid = p.pronamespace JOIN pg_language AS l ON l.oid = p.prolang"
        " WHERE n.nspname = 'public' AND p.proname = ANY(%s) ORDER BY p.proname, p.oid",
        [list(boundary.UPSTREAM_SQL)],
    )
    definitions: dict[str, list[str]] = {}
    for proname, definition in cursor.fetchall():
        definitions.setdefault(proname, []).append(definition)
    return {proname: _sha256("\n".join(texts)) for proname, texts in definitions.items()}


def _function_mismatches(cursor) -> list[str]:
    found = _function_fingerprints(cursor)
    return [
        f"{function} changed upstream (sha256 {found.get(function, 'missing')}): revisit {revisit},"
        f" then update UPSTREAM_SQL in {BOUNDARY}"
        for function, (expected, revisit) in boundary.UPSTREAM_SQL.items()
        if found.get(function) != expected
    ]


def _triggers(cursor) -> tuple[str, ...]:
    cursor.execute(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger"
        " WHERE tgrelid = 'procrastinate_jobs'::regclass AND NOT tgisinternal ORDER BY tgname"
    )
    return tuple(row[0] for row in cursor.fetchall())


def _trigger_mismatches(found: tuple[str, ...]) -> list[str]:
    expected = set(boundary.UPSTREAM_TRIGGERS)
    return [
        f"trigger {change} on procrastinate_jobs upstream: {definition} -- revisit {boundary.MIGRATION_TRIGGERS},"
        f" then update UPSTREAM_TRIGGERS in {BOUNDARY}"
        for change, definitions in (("new or changed", set(found) - expected), ("gone", expected - set(found)))
        for definition in sorted(definitions)
    ]


def _source_mismatches() -> list[str]:
    mismatches = []
    for target, (expected, revisit) in boundary.UPSTREAM_SOURCES.items():
        found = _sha256(inspect.getsource(boundary.resolve(target)))
        if found != expected:
            mismatches.append(
                f"{target} changed upstream (sha256 {found}): revisit {revisit},"
                f" then update UPSTREAM_SOURCES in {BOUNDARY}"
            )
    return mismatches


def test_the_sql_functions_the_engine_copies_are_as_checked(upstream):
    assert _function_mismatches(upstream.cursor()) == []


def test_the_triggers_on_procrastinate_jobs_are_as_checked(upstream):
    assert _trigger_mismatches(_triggers(upstream.cursor())) == []


def _constraints(cursor, table: str) -> dict[str, str]:
    cursor.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass", [table]
    )
    return dict(cursor.fetchall())


def test_the_constraints_our_migrations_drop_are_as_checked(upstream):
    for (table, name), (definition, revisit) in boundary.DROPPED_CONSTRAINTS.items():
        found = _constraints(upstream.cursor(), table).get(name)
        assert found == definition, f"{table}.{name} changed upstream ({found}): revisit {revisit}"


@pytest.mark.django_db
def test_our_migrations_drop_exactly_the_listed_constraints():
    with connection.cursor() as cursor:
        for table, name in boundary.DROPPED_CONSTRAINTS:
            assert name not in _constraints(cursor.cursor, table)


def test_the_methods_the_engine_replaces_are_as_checked():
    assert _source_mismatches() == []


@pytest.mark.django_db
def test_our_migrations_replace_exactly_the_listed_triggers_and_no_upstream_function():
    with connection.cursor() as cursor:
        assert _function_mismatches(cursor.cursor) == []  # ours never redefine Procrastinate's
        ours = _triggers(cursor.cursor)
    names = {definition.split()[2] for definition in ours}
    upstream_names = {definition.split()[2] for definition in boundary.UPSTREAM_TRIGGERS}
    assert set(boundary.REPLACED_TRIGGERS) <= upstream_names
    assert names == (upstream_names - set(boundary.REPLACED_TRIGGERS)) | set(boundary.OUR_TRIGGERS)


def test_the_contract_notices_a_changed_sql_function(upstream):
    with upstream.transaction(force_rollback=True):
        upstream.execute(
            "CREATE OR REPLACE FUNCTION procrastinate_finish_job_v1(job_id bigint, end_status procrastinate_job_status,"
            " delete_job boolean) RETURNS void LANGUAGE plpgsql AS $$ BEGIN NULL; END; $$"
        )
        mismatches = _function_mismatches(upstream.cursor())
    [mismatch] = mismatches
    assert mismatch.startswith("procrastinate_finish_job_v1 changed upstream (sha256 ")
    assert mismatch.endswith(f"revisit {boundary.MANAGER} (FINISH_JOBS), then update UPSTREAM_SQL in {BOUNDARY}")


def test_the_contract_notices_a_new_trigger(upstream):
    with upstream.transaction(force_rollback=True):
        upstream.execute(
            "CREATE TRIGGER procrastinate_trigger_new_v1 AFTER INSERT ON procrastinate_jobs"
            " FOR EACH ROW EXECUTE FUNCTION procrastinate_trigger_function_status_events_insert_v1()"
        )
        mismatches = _trigger_mismatches(_triggers(upstream.cursor()))
    assert mismatches == [
        "trigger new or changed on procrastinate_jobs upstream: CREATE TRIGGER procrastinate_trigger_new_v1"
        " AFTER INSERT ON public.procrastinate_jobs FOR EACH ROW EXECUTE FUNCTION"
        " procrastinate_trigger_function_status_events_insert_v1() -- revisit"
        f" jobs/migrations/0003_statement_level_triggers.py, then update UPSTREAM_TRIGGERS in {BOUNDARY}"
    ]


def test_the_contract_notices_a_changed_method(monkeypatch):
    def _start_side_tasks(self):
        return []

    monkeypatch.setattr(Worker, "_start_side_tasks", _start_side_tasks)

    [mismatch] = _source_mismatches()
    assert mismatch.startswith("procrastinate.worker:Worker._start_side_tasks changed upstream (sha256 ")
    assert mismatch.endswith(f"revisit {boundary.WORKER}, then update UPSTREAM_SOURCES in {BOUNDARY}")
