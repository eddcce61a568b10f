from django.urls import path
from rest_framework.routers import SimpleRouter

from notifications.apis import NotificationJobViewSet, NotificationMetricsApi, SendBulkApi, SendEmailApi

router = SimpleRouter(trailing_slash=True)
router.register("jobs", NotificationJobViewSet, basename="notification-job")

urlpatterns = [
    path("send-email/", SendEmailApi.as_view(), name="notification-send-email"),
    path("send-bulk/", SendBulkApi.as_view(), name="notification-send-bulk"),
    path("metrics/", NotificationMetricsApi.as_view(), name="notification-metrics"),
    *router.urls,
]
