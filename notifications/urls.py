from django.urls import path
from rest_framework.routers import SimpleRouter

from notifications.apis import (
    NotificationJobViewSet,
    NotificationMetricsApi,
    RecipientViewSet,
    SendBulkApi,
    SendEmailApi,
)

# Included at api/: recipients are a collection of their own, next to notifications/.
router = SimpleRouter(trailing_slash=True)
router.register("recipients", RecipientViewSet, basename="recipient")
router.register("notifications/jobs", NotificationJobViewSet, basename="notification-job")

urlpatterns = [
    path("notifications/send-email/", SendEmailApi.as_view(), name="notification-send-email"),
    path("notifications/send-bulk/", SendBulkApi.as_view(), name="notification-send-bulk"),
    path("notifications/metrics/", NotificationMetricsApi.as_view(), name="notification-metrics"),
    *router.urls,
]
