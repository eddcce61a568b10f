"""The start-up check of the engine's boundary (jobs/engine/boundary.py): it passes on the pinned
versions, and an upstream change to a private name fails it with one line naming the name, the
installed version and our file to revisit. The breaks are made here, on the real classes."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from procrastinate.app import App
from procrastinate.worker import Worker
from psycopg_pool import AsyncConnectionPool

from jobs.engine import boundary

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def _failure() -> str:
    with pytest.raises(ImproperlyConfigured) as raised:
        boundary.check()
    return str(raised.value)


def test_the_check_passes_on_the_pinned_versions(caplog):
    # Subclasses of listed classes, checked once imported (a worker never imports the schema).
    import core.cache
    import core.schema

    assert core.cache.PostgresDatabaseCache and core.schema.AutoSchema

    with caplog.at_level(logging.WARNING, logger=boundary.__name__):
        boundary.check()
    assert boundary.problems(everything=True) == []
    assert caplog.records == []


def test_the_checked_versions_are_the_pinned_ones():
    pins = dict(
        re.match(r"([\w-]+)(?:\[[\w,]+\])?==(\S+)", line).groups()
        for line in (BASE_DIR / "requirements/base.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert {name: pins[name] for name in boundary.CHECKED_VERSIONS} == boundary.CHECKED_VERSIONS


def test_a_method_gone_upstream_fails_the_check(monkeypatch):
    monkeypatch.delattr(Worker, "_process_job")

    assert _failure() == f"procrastinate 3.10.0: Worker._process_job is gone -- revisit {boundary.WORKER}"


def test_a_changed_signature_fails_the_check(monkeypatch):
    async def _process_job(self, context, job):
        pass

    monkeypatch.setattr(Worker, "_process_job", _process_job)

    assert _failure() == (
        "procrastinate 3.10.0: Worker._process_job(self, context, job) changed, expected (self, context)"
        f" -- revisit {boundary.WORKER}"
    )


def test_a_method_that_is_no_longer_a_coroutine_fails_the_check(monkeypatch):
    monkeypatch.setattr(AsyncConnectionPool, "_add_connection", lambda self, attempt, growing=False: None)

    assert _failure() == (
        "psycopg-pool 3.3.3: AsyncConnectionPool._add_connection is now a method, expected an async method"
        f" -- revisit {boundary.CONNECTOR}"
    )


def test_an_attribute_of_another_type_fails_the_check(monkeypatch):
    stock_init = Worker.__init__

    def init(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        self._new_job_event = asyncio.Condition()

    monkeypatch.setattr(Worker, "__init__", init)

    assert _failure() == (
        "procrastinate 3.10.0: Worker._new_job_event is now a Condition, expected an Event"
        f" -- revisit {boundary.WORKER} and {boundary.MIDDLEWARE} (_wake_at)"
    )


def test_an_attribute_the_constructor_no_longer_sets_fails_the_check(monkeypatch):
    stock_init = Worker.__init__

    def init(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        del self._job_ids_to_abort

    monkeypatch.setattr(Worker, "__init__", init)

    assert _failure() == (
        "procrastinate 3.10.0: Worker._job_ids_to_abort is no longer set by its constructor"
        f" -- revisit {boundary.WORKER}"
    )


def test_an_override_upstream_no_longer_calls_fails_the_check(monkeypatch):
    # As if Procrastinate's worker loop had stopped calling `_start_side_tasks`: read another
    # module's source in its place (the check reads the real text of the module it names).
    listed = next(n for n in boundary.NAMES if n.target.endswith("Worker._start_side_tasks"))
    moved = replace(listed, called_in="procrastinate.utils")
    monkeypatch.setattr(boundary, "NAMES", tuple(moved if n is listed else n for n in boundary.NAMES))

    assert _failure() == (
        "procrastinate 3.10.0: Worker._start_side_tasks is no longer called in procrastinate.utils"
        f" (our override would not run) -- revisit {boundary.WORKER}"
    )


def test_a_new_upstream_method_that_our_subclass_defines_fails_the_check(monkeypatch):
    # BatchingWorker has its own `_start`; were Procrastinate's worker to get one, ours would
    # replace it without anyone deciding so.
    monkeypatch.setattr(Worker, "_start", lambda self: None, raising=False)

    assert _failure() == (
        "procrastinate 3.10.0: Worker._start, which BatchingWorker uses or defines, is not in the boundary list"
        f" -- revisit {boundary.WORKER}"
    )


def test_an_unlisted_private_name_that_our_subclass_uses_fails_the_check(monkeypatch):
    monkeypatch.setattr(boundary, "NAMES", tuple(n for n in boundary.NAMES if not n.target.endswith("._stop_event")))

    assert _failure() == (
        "procrastinate 3.10.0: Worker._stop_event, which BatchingWorker uses or defines, is not in the boundary list"
        f" -- revisit {boundary.WORKER}"
    )


def test_an_assigned_method_gone_upstream_fails_the_check(monkeypatch):
    monkeypatch.delattr(App, "_worker")

    assert _failure() == f"procrastinate 3.10.0: App._worker is gone -- revisit {boundary.APP}"


def test_another_version_with_every_name_intact_is_a_warning_not_a_failure(monkeypatch, caplog):
    monkeypatch.setitem(boundary.CHECKED_VERSIONS, "procrastinate", "3.9.0")

    with caplog.at_level(logging.WARNING, logger=boundary.__name__):
        boundary.check()

    [record] = caplog.records
    assert "procrastinate 3.10.0, checked 3.9.0" in record.getMessage()


def test_a_process_does_not_start_when_a_name_changed():
    # What a worker or the web server does first (django.setup() runs jobs/apps.py's ready()),
    # with Procrastinate's `_update_heartbeat` renamed before Django starts.
    code = (
        "from procrastinate.worker import Worker\n"
        "Worker._send_heartbeat = Worker._update_heartbeat\n"
        "del Worker._update_heartbeat\n"
        "import django\n"
        "django.setup()\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings"}
    result = subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True)

    assert result.returncode != 0
    assert (
        "django.core.exceptions.ImproperlyConfigured: procrastinate 3.10.0: Worker._update_heartbeat is gone"
        f" -- revisit {boundary.WORKER}"
    ) in result.stderr.splitlines()


def test_every_listed_name_is_used_where_the_list_says():
    # Keeps the list honest when code moves: the file to revisit exists and names the attribute.
    for name in boundary.NAMES:
        attribute = name.display.rpartition(".")[2]
        paths = re.findall(r"[\w/]+\.py", name.revisit)
        assert paths, name
        sources = [(BASE_DIR / path).read_text() for path in paths]
        assert any(attribute in source for source in sources), f"{name.target} is not used in {name.revisit}"
