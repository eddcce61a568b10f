"""What each per-job feature costs (issue 14): the same queued no-op jobs drained by one worker
as `make run` starts it, once plain and once with each feature in use, in one run. The figure
is the CPU time per job of the worker and of PostgreSQL together (from /proc), the plain run
being the reference of the others; the rate is in the notes.

    python -m bench.run --only features
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench import figures
from bench.figures import queue_jobs
from bench.harness import Bench, Figure

OWNERS = 10  # the fair-claims variant: jobs of ten users, taken in turns


def _owners() -> list[int]:
    from tests.factories import make_user

    return [make_user(f"bench-owner-{n}-{time.time_ns()}").id for n in range(OWNERS)]


def _variants(total: int) -> dict[str, tuple[str, Callable[[], None], dict[str, str] | None]]:
    """name -> (task name, what queues the jobs, the worker's extra environment)."""
    from bench.tasks import noop, noop_keyed
    from jobs import job_batch, job_defer

    def batched() -> None:
        for start in range(0, total, 1000):
            with job_batch(name=f"bench {start}") as batch:
                queue_jobs(noop, min(1000, total - start), batch_id=batch.id)

    def dependent() -> None:
        # Each thousand waits for a parent queued before it: blocked at the defer, released
        # when the parent ends, every child's link row written and read.
        for start in range(0, total, 1000):
            parent = job_defer(noop, i=-1)
            queue_jobs(noop, min(1000, total - start), after=[parent])

    return {
        "no feature (owner-less jobs)": ("bench.noop", lambda: queue_jobs(noop, total), None),
        f"fair claims, jobs of {OWNERS} users": ("bench.noop", lambda: queue_jobs(noop, total, owners=_owners()), None),
        f"fair claims off, jobs of {OWNERS} users": (
            "bench.noop",
            lambda: queue_jobs(noop, total, owners=_owners()),
            {"JOBS_FAIR_CLAIMS": "false"},
        ),
        "a concurrency key per user": (
            "bench.noop_keyed",
            lambda: queue_jobs(noop_keyed, total, owners=_owners()),
            None,
        ),
        "in a batch of 1,000": ("bench.noop", batched, None),
        "after a parent (dependency)": ("bench.noop", dependent, None),
    }


def feature_costs(bench: Bench, *, quick: bool = False) -> list[Figure]:
    total = 2000 if quick else 10000
    runs: dict[str, dict] = {}
    for name, (task_name, queue, env) in _variants(total).items():
        bench.reset_jobs()
        queue()
        runs[name] = figures.drain(
            bench, task_name, total, lambda env=env: bench.project_worker(env=env), timeout=180, stock=False
        )
        bench.stop_children()
    plain_name = next(iter(runs))
    plain = figures._sum(runs[plain_name]["worker_us"], runs[plain_name]["postgres_us"])
    rows = []
    for name, run in runs.items():
        cost = figures._sum(run["worker_us"], run["postgres_us"])
        rows.append(
            Figure(
                f"CPU per job, {name}",
                cost,
                "us",
                "" if name == plain_name else "no feature",
                None if name == plain_name else plain,
                notes=f"{run['jobs']} jobs at {run['client_rate']:,.0f} jobs/s client-timed; worker "
                f"{run['worker_us']:,.0f} us + PostgreSQL {run['postgres_us'] or 0:,.0f} us; "
                + figures._statements_note(run["statements"] and run["statements"][:3]),
            )
        )
    return rows
