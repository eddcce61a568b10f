from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from jobs.console.apis import (
    BatchStreamApi,
    BatchViewSet,
    JobMetricsApi,
    JobStreamApi,
    JobViewSet,
    QueueListApi,
    QueuePauseApi,
    QueueResumeApi,
)

router = SimpleRouter(trailing_slash=True)
router.register("batches", BatchViewSet, basename="job-batch")
router.register("", JobViewSet, basename="job")

urlpatterns = [
    path("queues/", QueueListApi.as_view(), name="job-queues"),
    path("queues/<str:name>/pause/", QueuePauseApi.as_view(), name="job-queue-pause"),
    path("queues/<str:name>/resume/", QueueResumeApi.as_view(), name="job-queue-resume"),
    path("metrics/", JobMetricsApi.as_view(), name="job-metrics"),
    path("<int:pk>/stream/", JobStreamApi.as_view(), name="job-stream"),
    path("batches/<int:pk>/stream/", BatchStreamApi.as_view(), name="job-batch-stream"),
    *router.urls,
]
