"""The staff dashboard inside the admin (/admin/jobs/dashboard/).

The page shows queue depths, throughput, latency per task, failing tasks, paused queues, live
workers, the progress of running jobs, batches (with cancel and retry of their failed members),
jobs blocked by their parents and the concurrency limits in force (running / limit per key).
Its script polls `data/` every few seconds and redraws, so every number comes from PostgreSQL at
that moment. The actions (retry the failed jobs of a task, pause or resume a queue) are POSTs
with the CSRF token that answer JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_GET, require_POST

from core.errors import ApplicationError
from jobs.console import selectors, services
from jobs.models import CircuitBreaker
from jobs.tasking import queues

RETRY_PERMISSION = "jobs.retry_job"
CANCEL_PERMISSION = "jobs.cancel_job"
PAUSE_PERMISSION = "jobs.pause_queue"
POLL_MILLISECONDS = 2500
# Latency and failures are over the last day; throughput has its own two windows.
WINDOW_HOURS = 24


def user_may(user: Any, permission: str) -> bool:
    return bool(user.is_active and user.is_staff and user.has_perm(permission))


def dashboard_snapshot(*, user: Any) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data."""
    metrics = selectors.job_metrics(hours=WINDOW_HOURS)
    latency = [
        {
            "task": task,
            "started": numbers["started"],
            "finished": numbers["count"],
            "wait_ms": numbers["enqueue_to_start_ms"],
            "run_ms": numbers["run_time_ms"],
        }
        for task, numbers in sorted(metrics["tasks"].items())
    ]
    all_queues = selectors.queue_list()
    return {
        "generated_at": timezone.now(),
        "window_hours": WINDOW_HOURS,
        "queues": all_queues,
        "paused": [q for q in all_queues if q["paused"]],
        "throughput": {
            "hour": selectors.dashboard_throughput(span="1 hour", step="1 minute"),
            "day": selectors.dashboard_throughput(span="1 day", step="1 hour"),
        },
        "latency": latency,
        "failing": selectors.dashboard_failing_tasks(seconds=WINDOW_HOURS * 3600),
        "workers": selectors.live_workers(stalled_after_seconds=settings.WORKER_STALLED_SECONDS),
        "running": selectors.dashboard_running_progress(),
        "batches": selectors.dashboard_batches(),
        "blocked": selectors.dashboard_blocked_jobs(),
        "limits": selectors.dashboard_concurrency_limits(),
        "breakers": list(
            CircuitBreaker.objects.order_by("name").values("name", "state", "consecutive_failures", "opened_until")
        ),
        "permissions": {
            "retry": user_may(user, RETRY_PERMISSION),
            "pause": user_may(user, PAUSE_PERMISSION),
            "cancel": user_may(user, CANCEL_PERMISSION),
        },
    }


@require_GET
def dashboard_page(request: HttpRequest) -> HttpResponse:
    snapshot = dashboard_snapshot(user=request.user)
    context = {
        **admin.site.each_context(request),
        "title": "Job dashboard",
        "snapshot": snapshot,  # the first paint; the script then polls the data endpoint
        "poll_ms": POLL_MILLISECONDS,
    }
    return TemplateResponse(request, "admin/jobs/dashboard.html", context)


@require_GET
def dashboard_data(request: HttpRequest) -> JsonResponse:
    return JsonResponse(dashboard_snapshot(user=request.user))


def staff_action(permission: str) -> Callable:
    """A POST that answers JSON: 403 unless the user is active staff with `permission`,
    400 with field errors for bad input and 409 for a refused action (an ApplicationError),
    never a redirect to the login."""

    def decorate(view: Callable[[HttpRequest, dict[str, Any]], dict[str, Any]]) -> Callable:
        @wraps(view)
        def wrapper(request: HttpRequest) -> JsonResponse:
            if not user_may(request.user, permission):
                return JsonResponse({"detail": "You do not have permission to perform this action."}, status=403)
            try:
                return JsonResponse(view(request, _body(request)))
            except ApplicationError as exc:
                return JsonResponse({"detail": exc.message, **exc.extra}, status=exc.status_code)

        return never_cache(csrf_protect(require_POST(wrapper)))

    return decorate


def _body(request: HttpRequest) -> dict[str, Any]:
    if request.content_type == "application/json":
        try:
            body = json.loads(request.body or b"{}")
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise ApplicationError("The body is not valid JSON.") from exc
        if not isinstance(body, dict):
            raise ApplicationError("The body must be a JSON object.")
        return body
    return request.POST.dict()


def _text_field(body: dict[str, Any], name: str, *, max_length: int = 128) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApplicationError("Invalid input.", extra={name: ["This field is required."]})
    if len(value) > max_length:
        raise ApplicationError("Invalid input.", extra={name: [f"At most {max_length} characters."]})
    return value.strip()


def _queue_field(body: dict[str, Any]) -> str:
    queue = _text_field(body, "queue")
    if queue not in queues.ALL:
        raise ApplicationError("Invalid input.", extra={"queue": [f"Must be one of: {', '.join(queues.ALL)}."]})
    return queue


@staff_action(RETRY_PERMISSION)
def retry_failed(request: HttpRequest, body: dict[str, Any]) -> dict[str, Any]:
    task = _text_field(body, "task")
    outcome = services.job_retry_failed(task_name=task)
    if outcome["skipped"] and not outcome["retried"]:
        # Nothing could be retried: every failed job has a job of its queueing lock waiting.
        first = outcome["skipped_jobs"][0]["reason"]
        raise ApplicationError(
            f"No failed job of {task} was retried: {first}", status_code=409, extra={"task": task, **outcome}
        )
    return {"task": task, **outcome}


def _batch_field(body: dict[str, Any]) -> int:
    value = body.get("batch")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApplicationError("Invalid input.", extra={"batch": ["A batch id is required."]}) from None


@staff_action(CANCEL_PERMISSION)
def batch_cancel(request: HttpRequest, body: dict[str, Any]) -> dict[str, Any]:
    batch_id = _batch_field(body)
    return {"batch": batch_id, "cancelled": services.job_batch_cancel(batch_id=batch_id)}


@staff_action(RETRY_PERMISSION)
def batch_retry(request: HttpRequest, body: dict[str, Any]) -> dict[str, Any]:
    batch_id = _batch_field(body)
    return {"batch": batch_id, **services.job_batch_retry_failed(batch_id=batch_id)}


@staff_action(PAUSE_PERMISSION)
def queue_pause(request: HttpRequest, body: dict[str, Any]) -> dict[str, Any]:
    queue = _queue_field(body)
    services.queue_pause(queue=queue, by=request.user)
    return {"queue": queue, "paused": True}


@staff_action(PAUSE_PERMISSION)
def queue_resume(request: HttpRequest, body: dict[str, Any]) -> dict[str, Any]:
    queue = _queue_field(body)
    services.queue_resume(queue=queue)
    return {"queue": queue, "paused": False}


urlpatterns = [
    path("", admin.site.admin_view(dashboard_page), name="jobs-dashboard"),
    path("data/", admin.site.admin_view(dashboard_data), name="jobs-dashboard-data"),
    path("retry-failed/", retry_failed, name="jobs-dashboard-retry-failed"),
    path("pause/", queue_pause, name="jobs-dashboard-pause"),
    path("batch-cancel/", batch_cancel, name="jobs-dashboard-batch-cancel"),
    path("batch-retry/", batch_retry, name="jobs-dashboard-batch-retry"),
    path("resume/", queue_resume, name="jobs-dashboard-resume"),
]
