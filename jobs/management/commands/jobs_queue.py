"""`python manage.py jobs_queue pause <queue>` / `resume <queue>` / `list` / `reconcile`: operate
the queues from a shell, e.g. to hold a queue during an incident or a deploy of its consumers.
`reconcile` recomputes the concurrency limits' running counts (after a TRUNCATE, or triggers
disabled); the stalled-job rescue does it on every run too.

Pausing holds for every worker at its next fetch; jobs already running finish. Resuming wakes
idle workers at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from core.errors import ApplicationError
from jobs.console import selectors, services


class Command(BaseCommand):
    help = "Pause, resume or list the job queues."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        actions.add_parser("pause", help="workers stop taking the queue's jobs").add_argument("queue")
        actions.add_parser("resume", help="workers take the queue's jobs again").add_argument("queue")
        actions.add_parser("list", help="every queue: paused or not, jobs waiting and running")
        actions.add_parser("reconcile", help="recompute the concurrency limits' running counts from the running jobs")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        try:
            if action == "pause":
                paused = services.queue_pause(queue=options["queue"])
                self.stdout.write(f"Paused {paused.queue_name} (since {paused.paused_at:%Y-%m-%d %H:%M:%S %Z}).")
            elif action == "resume":
                services.queue_resume(queue=options["queue"])
                self.stdout.write(f"Resumed {options['queue']}.")
            elif action == "reconcile":
                fixed = services.jobs_concurrency_reconcile()
                for row in fixed:
                    self.stdout.write(f"{row['key']}: counted {row['counted']} running, {row['actual']} actually")
                self.stdout.write(f"Corrected {len(fixed)} concurrency key(s).")
            else:
                self._list()
        except ApplicationError as exc:
            details = "; ".join(f"{field}: {' '.join(errors)}" for field, errors in exc.extra.items())
            raise CommandError(f"{exc.message} {details}".strip()) from exc

    def _list(self) -> None:
        self.stdout.write(f"{'queue':<16}{'state':<10}{'todo':>8}{'doing':>8}{'failed':>8}  paused at")
        for queue in selectors.queue_list():
            counts = queue["counts"]
            state = "paused" if queue["paused"] else "running"
            since = f"{queue['paused_at']:%Y-%m-%d %H:%M:%S %Z}" if queue["paused_at"] else ""
            line = (
                f"{queue['name']:<16}{state:<10}{counts['todo']:>8}{counts['doing']:>8}{counts['failed']:>8}  {since}"
            )
            self.stdout.write(line.rstrip())
