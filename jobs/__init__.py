"""The job system's public face: what apps use, from one place.

    from jobs import job_task, job_defer, job_progress, queues, will_retry, JobSnooze

Inside, three rooms: `jobs.tasking` (the task author's toolkit, re-exported here),
`jobs.engine` (what runs jobs; apps never import it) and `jobs.console` (the operator's API,
admin and dashboard). See docs/architecture.md.

The names load on first use (PEP 562): Django imports this package while it fills the app
registry, before any model may be imported, and the toolkit's modules import models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy loading below returns, for type checkers and import-linter
    from jobs.console.dashboard import RETRY_PERMISSION, user_may
    from jobs.tasking import queues
    from jobs.tasking.breaker import breaker_check, breaker_record_failure, breaker_record_success, breaker_state
    from jobs.tasking.defer import job_defer, job_defer_bulk
    from jobs.tasking.erasure import job_cancel_waiting
    from jobs.tasking.fairness import SERVICE_PRIORITY
    from jobs.tasking.limits import TimeLimitExceeded
    from jobs.tasking.progress import job_progress, job_progress_async
    from jobs.tasking.ratelimit import rate_limit_wait
    from jobs.tasking.registry import RateLimit, job_task
    from jobs.tasking.retry import will_retry
    from jobs.tasking.snooze import JobSnooze, SnoozeLimitExceeded
    from jobs.tasking.webhooks import webhook_url_check, webhook_url_problem
    from jobs.tasking.workflows import (
        JobCall,
        job_batch,
        job_batch_counts,
        job_batch_open,
        job_batch_seal,
        job_call,
        job_chain,
        job_fan_in,
        job_parent_results,
    )

_SOURCES = {
    # Declaring and deferring tasks.
    "job_task": "jobs.tasking.registry",
    "RateLimit": "jobs.tasking.registry",
    "job_defer": "jobs.tasking.defer",
    "job_defer_bulk": "jobs.tasking.defer",
    "job_cancel_waiting": "jobs.tasking.erasure",
    "SERVICE_PRIORITY": "jobs.tasking.fairness",  # the band above every user's turn
    "queues": "jobs.tasking.queues",  # the module itself
    # Workflows: dependencies and batches.
    "JobCall": "jobs.tasking.workflows",
    "job_call": "jobs.tasking.workflows",
    "job_chain": "jobs.tasking.workflows",
    "job_fan_in": "jobs.tasking.workflows",
    "job_batch": "jobs.tasking.workflows",
    "job_batch_open": "jobs.tasking.workflows",
    "job_batch_seal": "jobs.tasking.workflows",
    "job_batch_counts": "jobs.tasking.workflows",
    # Inside a task.
    "job_progress": "jobs.tasking.progress",
    "job_progress_async": "jobs.tasking.progress",
    "job_parent_results": "jobs.tasking.workflows",
    "will_retry": "jobs.tasking.retry",
    "JobSnooze": "jobs.tasking.snooze",  # raise JobSnooze(seconds=30): run again later, same attempt
    "SnoozeLimitExceeded": "jobs.tasking.snooze",
    "TimeLimitExceeded": "jobs.tasking.limits",
    "rate_limit_wait": "jobs.tasking.ratelimit",
    "breaker_check": "jobs.tasking.breaker",
    "breaker_record_failure": "jobs.tasking.breaker",
    "breaker_record_success": "jobs.tasking.breaker",
    "breaker_state": "jobs.tasking.breaker",
    # Completion webhooks: checking a caller's callback URL at the edge.
    "webhook_url_check": "jobs.tasking.webhooks",
    "webhook_url_problem": "jobs.tasking.webhooks",
    # An app's admin actions that retry jobs ask the console's permission.
    "RETRY_PERMISSION": "jobs.console.dashboard",
    "user_may": "jobs.console.dashboard",
}

__all__ = [
    "RETRY_PERMISSION",
    "SERVICE_PRIORITY",
    "JobCall",
    "JobSnooze",
    "RateLimit",
    "SnoozeLimitExceeded",
    "TimeLimitExceeded",
    "breaker_check",
    "breaker_record_failure",
    "breaker_record_success",
    "breaker_state",
    "job_batch",
    "job_batch_counts",
    "job_batch_open",
    "job_batch_seal",
    "job_call",
    "job_cancel_waiting",
    "job_chain",
    "job_defer",
    "job_defer_bulk",
    "job_fan_in",
    "job_parent_results",
    "job_progress",
    "job_progress_async",
    "job_task",
    "queues",
    "rate_limit_wait",
    "user_may",
    "webhook_url_check",
    "webhook_url_problem",
    "will_retry",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'jobs' has no attribute {name!r}")
    module = importlib.import_module(source)
    value = module if source.endswith(f".{name}") else getattr(module, name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
