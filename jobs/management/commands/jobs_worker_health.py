"""`python manage.py jobs_worker_health`: the health check of a worker's container.

Exits 0 when the worker of this container (the id it wrote to WORKER_ID_FILE when it
registered) has a heartbeat in procrastinate_workers younger than WORKER_STALLED_SECONDS, the
age at which other workers count it dead and rescue its jobs; otherwise 1, with the reason on
one line (Docker keeps it in `docker inspect`). A worker that cannot reach the database, whose
heartbeat loop is stuck or whose row is gone is unhealthy.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from jobs.console.selectors import worker_heartbeat_age
from jobs.engine.worker import read_worker_id_file


class Command(BaseCommand):
    help = "Exit 0 when this container's worker has a fresh heartbeat, 1 otherwise."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--max-age",
            type=float,
            default=None,
            help="oldest heartbeat that counts as fresh, in seconds (default: WORKER_STALLED_SECONDS)",
        )

    def handle(self, *args: Any, max_age: float | None, **options: Any) -> None:
        max_age = settings.WORKER_STALLED_SECONDS if max_age is None else max_age
        if not settings.WORKER_ID_FILE:
            raise CommandError("WORKER_ID_FILE is not set, so the worker records no id to check")
        worker_id = read_worker_id_file()
        if worker_id is None:
            raise CommandError(f"no worker id in {settings.WORKER_ID_FILE} (the worker has not registered yet)")
        try:
            age = worker_heartbeat_age(worker_id=worker_id)
        except DatabaseError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise CommandError(f"cannot read worker {worker_id}'s heartbeat: {lines[0] if lines else exc!r}") from exc
        if age is None:
            raise CommandError(f"worker {worker_id} has no row in procrastinate_workers (stopped or pruned)")
        if age > max_age:
            raise CommandError(f"worker {worker_id}'s last heartbeat is {age:.0f} s old (more than {max_age:g} s)")
        self.stdout.write(f"worker {worker_id}: heartbeat {age:.1f} s ago")
