"""The job system in the admin: Procrastinate's jobs (its retry, cancel and abort actions, here
gated by our permissions), read-only events and workers, and a Queues page (every queue with
its counts, paused or not, with pause and resume) that links to the dashboard."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import BooleanField, Count, ExpressionWrapper, Q
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from procrastinate.contrib.django.admin import ProcrastinateJobAdmin
from procrastinate.contrib.django.models import ProcrastinateEvent, ProcrastinateJob, ProcrastinateWorker

from core.errors import ApplicationError
from jobs.console import selectors, services
from jobs.console.dashboard import PAUSE_PERMISSION, RETRY_PERMISSION, user_may
from jobs.models import PausedQueue

CANCEL_PERMISSION = "jobs.cancel_job"


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ProcrastinateEvent)
class ProcrastinateEventAdmin(ReadOnlyAdmin):
    list_display = ("id", "job_id", "task_name", "type", "at")
    list_filter = ("type",)
    list_select_related = ("job",)
    date_hierarchy = "at"

    @admin.display(description="task")
    def task_name(self, event: ProcrastinateEvent) -> str:
        return event.job.task_name


@admin.register(ProcrastinateWorker)
class ProcrastinateWorkerAdmin(ReadOnlyAdmin):
    list_display = ("id", "host", "last_heartbeat", "alive", "running_jobs")
    ordering = ("-last_heartbeat",)

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                running=Count("procrastinatejob", filter=Q(procrastinatejob__status="doing")),
                # Judged on the database's clock, as the rescue judges it: not this web host's.
                alive_now=ExpressionWrapper(
                    Q(last_heartbeat__gte=Now() - timedelta(seconds=settings.WORKER_STALLED_SECONDS)),
                    output_field=BooleanField(),
                ),
                host=RawSQL('"procrastinate_workers"."jobs_host"', ()),  # migration 0014
            )
        )

    @admin.display(boolean=True)
    def alive(self, worker: ProcrastinateWorker) -> bool:
        return worker.alive_now

    @admin.display(description="host")
    def host(self, worker: ProcrastinateWorker) -> str:
        return worker.host or ""

    @admin.display(description="running jobs", ordering="running")
    def running_jobs(self, worker: ProcrastinateWorker) -> int:
        return worker.running


# Procrastinate's own admin offers retry, cancel and abort to anyone who can open the page:
# the same page and actions here, each offered only to staff holding our permission for it.
admin.site.unregister(ProcrastinateJob)


@admin.register(ProcrastinateJob)
class JobAdmin(ProcrastinateJobAdmin):
    actions = ["retry", "cancel", "abort"]

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return user_may(request.user, RETRY_PERMISSION)

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return user_may(request.user, CANCEL_PERMISSION)

    @admin.action(description="Retry Job (failed and stuck 'doing' jobs)", permissions=["retry"])
    def retry(self, request: HttpRequest, queryset) -> None:
        # Each job on its own (Procrastinate's action stops at the first that fails): one whose
        # queueing lock has a job waiting is skipped, with the reason.
        retried = 0
        for job_id in queryset.filter(status__in=("failed", "doing")).order_by("id").values_list("id", flat=True):
            try:
                services.job_retry_stuck(job_id=job_id)
            except ApplicationError as exc:
                self.message_user(request, f"Job {job_id} not retried: {exc.message}", messages.WARNING)
                continue
            retried += 1
        self.message_user(request, f"Retried {retried} job(s).", messages.SUCCESS)

    @admin.action(description="Cancel Job (only 'todo' jobs)", permissions=["cancel"])
    def cancel(self, request: HttpRequest, queryset) -> None:
        count = queryset.filter(status="todo").count()
        super().cancel(request, queryset)
        self.message_user(request, f"Cancelled {count} job(s).", messages.SUCCESS)

    @admin.action(description="Abort Job (includes 'todo' & 'doing' jobs)", permissions=["cancel"])
    def abort(self, request: HttpRequest, queryset) -> None:
        count = queryset.filter(status__in=("todo", "doing")).count()
        super().abort(request, queryset)
        self.message_user(request, f"Asked {count} job(s) to abort.", messages.SUCCESS)


@admin.register(PausedQueue)
class QueueAdmin(admin.ModelAdmin):
    """The Queues page: every queue, not only the paused ones, with pause and resume buttons for
    staff holding jobs.pause_queue. Rows are written only through the services."""

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        user = request.user
        return (
            user.is_active
            and user.is_staff
            and (user.has_perm("jobs.view_pausedqueue") or user_may(user, PAUSE_PERMISSION))
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        may_pause = user_may(request.user, PAUSE_PERMISSION)
        if request.method == "POST":
            if not may_pause:
                raise PermissionDenied
            self._apply(request, action=request.POST.get("action", ""), queue=request.POST.get("queue", ""))
            return HttpResponseRedirect(request.get_full_path())
        context = {
            **self.admin_site.each_context(request),
            "title": "Queues",
            "opts": self.model._meta,
            "queues": selectors.queue_list(),
            "may_pause": may_pause,
            "may_retry": user_may(request.user, RETRY_PERMISSION),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/jobs/queues.html", context)

    def _apply(self, request: HttpRequest, *, action: str, queue: str) -> None:
        try:
            if action == "pause":
                services.queue_pause(queue=queue, by=request.user)
                self.message_user(request, f"Queue {queue} paused: workers stop taking its jobs.", messages.SUCCESS)
            elif action == "resume":
                services.queue_resume(queue=queue)
                self.message_user(request, f"Queue {queue} resumed.", messages.SUCCESS)
            else:
                self.message_user(request, "Unknown action.", messages.ERROR)
        except ApplicationError as exc:
            details = "; ".join(" ".join(errors) for errors in exc.extra.values())
            self.message_user(request, f"{exc.message} {details}".strip(), messages.ERROR)
