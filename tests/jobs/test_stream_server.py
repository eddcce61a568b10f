"""Job streams (SSE) under the production server command, against the test database.

The server is started exactly as the Dockerfile starts it (bench/harness.py reads its CMD and
GUNICORN_CMD_ARGS), on a free 127.0.0.1 port: open streams must cost neither a server thread nor
a PostgreSQL connection each, and the caps per user (across processes) and per process answer
429 with Retry-After.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.authtoken.models import Token

from jobs.tasking.defer import job_defer
from tests.factories import make_user
from tests.helpers import wait_for
from tests.jobs.tasks_for_tests import later
from tests.production_server import ANSWER_TIMEOUT, Server, Stream

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def servers(tmp_path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def _token(user) -> str:
    return Token.objects.get_or_create(user=user)[0].key


def _job_for_next_year(owner) -> int:
    return job_defer(later, owner_id=owner.id, schedule_at=timezone.now() + timedelta(days=365))


def _database_connections() -> int:
    """Server sessions on the test database, ours excluded."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def _open(server: Server, job_id: int, token: str, count: int) -> list[Stream]:
    streams = [Stream(server, job_id, token) for _ in range(count)]
    return streams


def _the_api_answers(server: Server, token: str) -> None:
    status, body = server.request("GET", "/api/health/", timeout=ANSWER_TIMEOUT)
    # 503 "unhealthy" here only because no job worker runs: the answer itself is what matters.
    assert status in (200, 503) and body["database"] == "up", body
    status, body = server.request(
        "POST", "/api/notes/", token=token, body={"content": "still answering #sse"}, timeout=ANSWER_TIMEOUT
    )
    assert status == 201, body


def test_with_200_open_streams_the_api_answers_and_database_connections_do_not_grow(servers, tmp_path):
    owner = make_user("streamer")
    token = _token(owner)
    job_id = _job_for_next_year(owner)
    server = Server(tmp_path, env={"JOBS_STREAM_MAX_PER_USER": "0"})
    servers.append(server)
    streams: list[Stream] = []
    try:
        streams += _open(server, job_id, token, 10)
        _the_api_answers(server, token)
        assert [stream.started() for stream in streams] == [200] * 10
        assert b'data: {"status": "scheduled"}' in streams[0].data
        _the_api_answers(server, token)  # the pool has what plain requests need
        with_10 = _database_connections()
        threads_with_10 = server.threads()

        streams += _open(server, job_id, token, 190)
        _the_api_answers(server, token)  # while the 190 new streams are being opened
        assert [stream.started() for stream in streams] == [200] * 200
        _the_api_answers(server, token)
        with_200 = _database_connections()
        threads_with_200 = server.threads()
    finally:
        for stream in streams:
            stream.close()
    # One listening connection per process whatever the number of streams, plus the pools' few.
    assert with_200 - with_10 <= 2, (with_10, with_200)
    # Nor a thread each (the request threads of plain requests come and go).
    assert threads_with_200 - threads_with_10 <= 8, (threads_with_10, threads_with_200)


def test_the_per_user_cap_holds_across_processes_and_a_killed_process_frees_its_slots(servers, tmp_path):
    owner, other = make_user("capped"), make_user("someone-else")
    token, other_token = _token(owner), _token(other)
    job_id = _job_for_next_year(owner)
    other_job = _job_for_next_year(other)
    env = {"JOBS_STREAM_MAX_PER_USER": "2"}
    a = Server(tmp_path, env=env, extra_args=("--workers", "1"))
    b = Server(tmp_path, env=env, extra_args=("--workers", "1"))
    servers += [a, b]
    held: list[Stream] = []
    try:
        held += [Stream(a, job_id, token), Stream(b, job_id, token)]
        assert [stream.started() for stream in held] == [200, 200]

        for server in (a, b):
            refused = Stream(server, job_id, token)
            assert refused.started() == 429
            assert int(refused.header("Retry-After")) > 0
            assert "limit" in refused.error()["detail"]
            refused.close()
        # The cap is per user.
        theirs = Stream(a, other_job, other_token)
        assert theirs.started() == 200
        theirs.close()

        # A stream that ends gives its slot back, to any process.
        held.pop(1).close()  # the one on b
        held.append(_opened_once_free(a, job_id, token))

        # A process that dies (no clean-up at all) gives its slots back too: PostgreSQL
        # releases the locks of its listening connection.
        for pid in a.worker_pids():
            os.kill(pid, signal.SIGKILL)
        held.append(_opened_once_free(b, job_id, token))
        held.append(_opened_once_free(b, job_id, token))
        refused = Stream(b, job_id, token)
        assert refused.started() == 429
        refused.close()
    finally:
        for stream in held:
            stream.close()


def _opened_once_free(server: Server, job_id: int, token: str) -> Stream:
    def attempt() -> Stream | None:
        stream = Stream(server, job_id, token)
        if stream.started() == 200:
            return stream
        stream.close()
        return None

    return wait_for(attempt, timeout=30, interval=0.3, what="a stream slot to be free")


def test_the_per_process_cap_answers_429_with_retry_after(servers, tmp_path):
    users = [make_user(f"viewer-{n}") for n in range(4)]
    jobs = [_job_for_next_year(user) for user in users]
    server = Server(tmp_path, env={"JOBS_STREAM_MAX_PER_PROCESS": "3"}, extra_args=("--workers", "1"))
    servers.append(server)
    held = [Stream(server, job, _token(user)) for user, job in zip(users[:3], jobs[:3], strict=True)]
    try:
        assert [stream.started() for stream in held] == [200] * 3
        refused = Stream(server, jobs[3], _token(users[3]))
        assert refused.started() == 429
        assert int(refused.header("Retry-After")) > 0
        assert "limit" in refused.error()["detail"]
        refused.close()
        _the_api_answers(server, _token(users[3]))  # only streams are capped

        held.pop(0).close()
        held.append(_opened_once_free(server, jobs[3], _token(users[3])))
    finally:
        for stream in held:
            stream.close()
