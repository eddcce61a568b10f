"""`manage.py jobs_worker_health`, a worker container's health check: healthy while the worker
that wrote WORKER_ID_FILE has a fresh heartbeat, unhealthy once it stopped, stalled, or never
registered."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from jobs.tasking import queues
from tests.helpers import BASE_DIR, database_url, start_worker_process, stop_worker, wait_for


def _health(id_file, **env: str) -> subprocess.CompletedProcess:
    """The compose file's health check, as Docker runs it in the worker's container."""
    return subprocess.run(
        [sys.executable, "manage.py", "jobs_worker_health"],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": database_url(), "WORKER_ID_FILE": str(id_file), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _recorded_id(id_file) -> int | None:
    try:
        return int(id_file.read_text())
    except (OSError, ValueError):
        return None


def _worker_ids() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM procrastinate_workers ORDER BY id")
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db(transaction=True)
def test_a_running_worker_is_healthy_and_a_stopped_one_is_not(tmp_path):
    id_file = tmp_path / "worker.id"
    assert _health(id_file).returncode == 1  # nothing registered yet: the container's start period

    worker = start_worker_process("--queues", queues.IMPORTS, env={"WORKER_ID_FILE": str(id_file)})
    try:
        worker_id = wait_for(lambda: _recorded_id(id_file), timeout=60, what="the worker's id file")
        assert _worker_ids() == [worker_id]
        healthy = _health(id_file)
        assert healthy.returncode == 0, healthy.stderr
        assert f"worker {worker_id}" in healthy.stdout
    finally:
        output = stop_worker(worker)

    stopped = _health(id_file)  # a graceful stop deletes the row
    assert stopped.returncode == 1, output
    assert stopped.stderr.strip().count("\n") == 0, stopped.stderr
    assert f"worker {worker_id} has no row" in stopped.stderr


@pytest.mark.django_db(transaction=True)
def test_a_worker_that_registers_again_records_its_new_id(tmp_path):
    """Its row pruned (as another worker does to a silent one), it registers again: the check
    follows it to the new row rather than calling it dead."""
    id_file = tmp_path / "worker.id"
    env = {"WORKER_ID_FILE": str(id_file), "WORKER_HEARTBEAT_SECONDS": "0.2"}
    worker = start_worker_process("--queues", queues.IMPORTS, env=env)
    try:
        first = wait_for(lambda: _recorded_id(id_file), timeout=60, what="the worker's id file")
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM procrastinate_workers WHERE id = %s", [first])
        second = wait_for(lambda: (_recorded_id(id_file) or first) != first and _recorded_id(id_file), what="a new id")
        assert _worker_ids() == [second]
        healthy = _health(id_file)
        assert healthy.returncode == 0, healthy.stderr
    finally:
        stop_worker(worker)


@pytest.mark.django_db
def test_a_stale_heartbeat_is_unhealthy(tmp_path, settings):
    settings.WORKER_ID_FILE = str(tmp_path / "worker.id")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - interval '40 seconds') RETURNING id"
        )
        worker_id = cursor.fetchone()[0]
    (tmp_path / "worker.id").write_text(f"{worker_id}\n")

    with pytest.raises(CommandError, match=f"worker {worker_id}'s last heartbeat is 40 s old"):
        call_command("jobs_worker_health")  # WORKER_STALLED_SECONDS: 30
    call_command("jobs_worker_health", "--max-age", "60")

    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_workers SET last_heartbeat = now() WHERE id = %s", [worker_id])
    call_command("jobs_worker_health")


def test_without_an_id_file_setting_or_id_it_is_unhealthy(tmp_path, settings):
    settings.WORKER_ID_FILE = ""
    with pytest.raises(CommandError, match="WORKER_ID_FILE is not set"):
        call_command("jobs_worker_health")
    settings.WORKER_ID_FILE = str(tmp_path / "worker.id")
    (tmp_path / "worker.id").write_text("half")
    with pytest.raises(CommandError, match="no worker id in"):
        call_command("jobs_worker_health")


def test_an_unreachable_database_is_unhealthy_in_one_line(tmp_path):
    id_file = tmp_path / "worker.id"
    id_file.write_text("1\n")
    result = _health(id_file, DATABASE_URL="postgres://postgres@127.0.0.1:1/secondbrain", DATABASE_CONNECT_TIMEOUT="2")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot read worker 1's heartbeat" in result.stderr
