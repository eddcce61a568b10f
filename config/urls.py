from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from core.apis import AccountEraseApi, TokenApi
from jobs.console.apis import WebhookSecretApi, WebhookSecretRotateApi
from observability.apis import HealthApi
from observability.metrics import metrics_view

urlpatterns = [
    path("admin/jobs/dashboard/", include("jobs.console.dashboard")),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("api/auth/token/", TokenApi.as_view(), name="auth-token"),
    path("api/auth/erase/", AccountEraseApi.as_view(), name="auth-erase"),
    path("api/health/", HealthApi.as_view(), name="health"),
    path("api/notes/", include("notes.urls")),
    path("api/", include("notifications.urls")),  # notifications/ and recipients/
    path("api/", include("digests.urls")),  # digests/ and digest-schedules/
    path("api/jobs/", include("jobs.console.urls")),
    path("api/webhooks/secret/", WebhookSecretApi.as_view(), name="webhook-secret"),
    path("api/webhooks/secret/rotate/", WebhookSecretRotateApi.as_view(), name="webhook-secret-rotate"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
]

# JSON error pages under /api/ (a URL no route matches, a refused Host), HTML elsewhere.
handler400 = "core.handlers.bad_request"
handler404 = "core.handlers.page_not_found"
handler500 = "core.handlers.server_error"
