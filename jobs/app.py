"""Wires the job layer into Procrastinate's app (settings.PROCRASTINATE_ON_APP_READY)."""

from __future__ import annotations

from procrastinate import App

from jobs.manager import PausableJobManager
from jobs.middleware import job_middleware


def on_app_ready(app: App) -> None:
    app.job_manager = PausableJobManager(app.connector)
    app.worker_defaults = {**app.worker_defaults, "worker_middleware": [job_middleware]}
