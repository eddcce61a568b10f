from __future__ import annotations

import django_filters
from procrastinate.contrib.django.models import ProcrastinateJob

from jobs.console.selectors import job_filter_batch, job_filter_state

STATUS_CHOICES = [(s, s) for s in (*ProcrastinateJob.STATUSES, "scheduled", "blocked", "waiting")]


class JobFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(
        choices=STATUS_CHOICES,
        method="filter_status",
        help_text="A Procrastinate status; `scheduled` is todo and not yet due, `blocked` is todo and waiting"
        " for its parents, `waiting` is todo, due and not blocked.",
    )
    queue = django_filters.CharFilter(field_name="queue_name")
    task = django_filters.CharFilter(field_name="task_name")
    batch = django_filters.NumberFilter(method="filter_batch", help_text="The members of this batch (its id).")

    class Meta:
        model = ProcrastinateJob
        fields = ["status", "queue", "task", "batch"]

    def filter_status(self, queryset, name: str, value: str):
        return job_filter_state(queryset, value)

    def filter_batch(self, queryset, name: str, value):
        return job_filter_batch(queryset, int(value))
