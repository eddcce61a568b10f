"""Procrastinate registers its jobs (with retry, cancel and abort actions); events and workers
get read-only pages here so an operator sees the whole picture in one admin."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib import admin
from django.db.models import Count, Q
from django.utils import timezone
from procrastinate.contrib.django.models import ProcrastinateEvent, ProcrastinateWorker


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
    list_display = ("id", "last_heartbeat", "alive", "running_jobs")
    ordering = ("-last_heartbeat",)

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(running=Count("procrastinatejob", filter=Q(procrastinatejob__status="doing")))
        )

    @admin.display(boolean=True)
    def alive(self, worker: ProcrastinateWorker) -> bool:
        return worker.last_heartbeat >= timezone.now() - timedelta(seconds=settings.WORKER_STALLED_SECONDS)

    @admin.display(description="running jobs", ordering="running")
    def running_jobs(self, worker: ProcrastinateWorker) -> int:
        return worker.running
