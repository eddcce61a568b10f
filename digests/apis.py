from __future__ import annotations

from rest_framework import viewsets

from core.idempotency import IdempotentCreateMixin
from digests import selectors, services
from digests.models import Digest, DigestSchedule
from digests.serializers import DigestScheduleSerializer, DigestSerializer


class DigestScheduleViewSet(IdempotentCreateMixin, viewsets.ModelViewSet):
    """The caller's digest schedules. `next_digest_scheduled` is recomputed on every change."""

    serializer_class = DigestScheduleSerializer
    queryset = DigestSchedule.objects.none()
    filterset_fields = {"recipient": ["exact"], "frequency": ["exact"], "active": ["exact"]}
    ordering_fields = ["next_digest_scheduled", "created_at"]

    def get_queryset(self):
        return selectors.digest_schedule_list(owner=self.request.user)

    def perform_create(self, serializer: DigestScheduleSerializer) -> None:
        serializer.instance = services.digest_schedule_create(owner=self.request.user, **serializer.validated_data)

    def perform_update(self, serializer: DigestScheduleSerializer) -> None:
        serializer.instance = services.digest_schedule_update(schedule=serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance: DigestSchedule) -> None:
        services.digest_schedule_delete(schedule=instance)


class DigestViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = DigestSerializer
    queryset = Digest.objects.none()
    ordering_fields = ["period_end"]

    def get_queryset(self):
        return selectors.digest_list(owner=self.request.user)
