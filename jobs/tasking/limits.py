"""The error of a job past its time limit (`job_task(time_limit=...)`, enforced by the worker
middleware in `jobs/engine/middleware.py`)."""

from __future__ import annotations


class TimeLimitExceeded(Exception):
    permanent = False  # a retry may well finish in time
