from __future__ import annotations

import django_filters

from notifications.models import DeliveryMethod, NotificationJob, NotificationType, Status


class NotificationJobFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=Status.choices)
    delivery_method = django_filters.ChoiceFilter(choices=DeliveryMethod.choices)
    notification_type = django_filters.ChoiceFilter(choices=NotificationType.choices)
    recipient = django_filters.NumberFilter(field_name="recipient_id")

    class Meta:
        model = NotificationJob
        fields = ["status", "delivery_method", "notification_type", "recipient"]
