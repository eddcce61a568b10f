"""The commit point's COMMIT and the final dot leave back to back, whatever the worker's other
threads are doing.

A worker killed between the two loses the e-mail (the row says sent, the server discards the
message), so that gap must be as short as two system calls. If the GIL is released after the
COMMIT has left (psycopg releases it around its sends) another thread of the worker may hold it
for a whole switch interval before the dot follows. A thread that never gives up the GIL and a
long switch interval make that gap measurable: the stamps come from a PostgreSQL proxy and an
SMTP server in a process of their own (tests/peers/wire_clock.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from django.db import connection

from notifications import services
from notifications.models import NotificationJob
from tests.factories import make_recipient, make_user
from tests.helpers import BASE_DIR

SWITCH_INTERVAL = 0.1  # how long a GIL-hungry thread may hold the GIL when another one asks


@pytest.fixture
def wire_clock(settings) -> Iterator[subprocess.Popen]:
    database = connection.settings_dict
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.peers.wire_clock", database["HOST"] or "127.0.0.1", str(database["PORT"])],
        cwd=BASE_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ports = json.loads(process.stdout.readline())
    settings.EMAIL_BACKEND = "notifications.mail.ExactlyOnceSMTPBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", ports["smtp_port"], 5
    settings.NOTIFICATIONS_RATE_PER_SECOND = 1000
    saved = (database["HOST"], database["PORT"])
    connection.close()
    database["HOST"], database["PORT"] = "127.0.0.1", ports["pg_port"]
    process.ports = ports
    yield process
    connection.close()
    database["HOST"], database["PORT"] = saved
    process.stdin.close()
    process.wait(10)


def _stamps(process: subprocess.Popen) -> dict[str, list[float]]:
    process.stdin.write("report\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())


@pytest.mark.django_db(transaction=True)
def test_no_other_thread_runs_between_the_commit_and_the_final_dot(wire_clock):
    owner = make_user("gil")
    recipient = make_recipient(owner)
    notifications = [
        services.notification_send_email(
            owner=owner,
            recipient=recipient,
            subject=f"Hi {n}",
            body="Hi",
            notification_type="system",
            priority="normal",
        )
        for n in range(3)
    ]
    before = _stamps(wire_clock)

    stop = threading.Event()

    def hold_the_gil() -> None:  # pure Python: gives the GIL up only when asked to
        while not stop.is_set():
            pass

    saved_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    hog = threading.Thread(target=hold_the_gil)
    hog.start()
    try:
        for notification in notifications:
            assert services.notification_deliver(notification_id=notification.id, attempt=1) == "sent"
    finally:
        stop.set()
        hog.join()
        sys.setswitchinterval(saved_interval)

    stamps = _stamps(wire_clock)
    dots = stamps["dots"][len(before["dots"]) :]
    assert len(dots) == 3, stamps
    # Each dot's commit point is the last COMMIT that reached the database before it (the job's
    # other transactions, the rate limit's for one, commit earlier or later).
    gaps = [dot - max(commit for commit in stamps["commits"] if commit < dot) for dot in dots]
    # Two system calls apart; a handover of the GIL would cost the whole switch interval.
    assert max(gaps) < SWITCH_INTERVAL / 4, [f"{gap * 1000:.1f} ms" for gap in gaps]
    assert set(NotificationJob.objects.values_list("status", flat=True)) == {"sent"}
