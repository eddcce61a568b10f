"""Wires the job layer into Procrastinate's app (settings.PROCRASTINATE_ON_APP_READY)."""

from __future__ import annotations

from procrastinate import App

from jobs.engine.connector import worker_connector
from jobs.engine.manager import BatchingJobManager
from jobs.engine.middleware import job_middleware
from jobs.engine.worker import BatchingWorker


def on_app_ready(app: App) -> None:
    app.job_manager = BatchingJobManager(app.connector)
    app.worker_defaults = {**app.worker_defaults, "worker_middleware": [job_middleware]}

    # `manage.py procrastinate worker` and `app.run_worker()` build their worker here.
    def worker(**kwargs):
        return BatchingWorker(app=app, **{**app.worker_defaults, **kwargs})

    app._worker = worker
    # `manage.py procrastinate worker` swaps Django's connector for this one while it runs.
    app.connector.get_worker_connector = worker_connector
