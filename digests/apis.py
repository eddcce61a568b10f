from __future__ import annotations

from rest_framework import viewsets

from core.idempotency import IdempotentCreateMixin
from digests import selectors, services
from digests.models import RecipientDigestSchedule, WeeklyDigest
from digests.serializers import RecipientDigestScheduleSerializer, WeeklyDigestSerializer


class RecipientDigestScheduleViewSet(IdempotentCreateMixin, viewsets.ModelViewSet):
    """The caller's digest schedules. `next_digest_scheduled` is recomputed on every change."""

    serializer_class = RecipientDigestScheduleSerializer
    queryset = RecipientDigestSchedule.objects.none()
    filterset_fields = {"recipient": ["exact"], "frequency": ["exact"], "active": ["exact"]}
    ordering_fields = ["next_digest_scheduled", "created_at"]

    def get_queryset(self):
        return selectors.recipient_digest_schedule_list(owner=self.request.user)

    def perform_create(self, serializer: RecipientDigestScheduleSerializer) -> None:
        serializer.instance = services.recipient_digest_schedule_create(
            owner=self.request.user, **serializer.validated_data
        )

    def perform_update(self, serializer: RecipientDigestScheduleSerializer) -> None:
        serializer.instance = services.recipient_digest_schedule_update(
            schedule=serializer.instance, **serializer.validated_data
        )

    def perform_destroy(self, instance: RecipientDigestSchedule) -> None:
        services.recipient_digest_schedule_delete(schedule=instance)


class WeeklyDigestViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = WeeklyDigestSerializer
    queryset = WeeklyDigest.objects.none()
    ordering_fields = ["period_end"]

    def get_queryset(self):
        return selectors.weekly_digest_list(owner=self.request.user)
