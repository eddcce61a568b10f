"""The benchmark's no-op task, registered in the project's app (PROCRASTINATE_IMPORT_PATHS=bench.tasks),
so it runs through the project's own worker configuration: middleware, paused-queue fetch and all."""

from __future__ import annotations

from jobs import job_task


@job_task(name="bench.noop", queue="bench")
def noop(i: int = 0) -> None:
    return None
