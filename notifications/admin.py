from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest

from core.errors import ApplicationError
from jobs import RETRY_PERMISSION, user_may
from notifications import selectors, services
from notifications.models import DeliveryLog, NotificationJob, Recipient, Status

# Re-queueing or cancelling a delivery acts on a job, so it needs the jobs' own permissions, as
# the job admin's and the dashboard's actions do (superusers have them).
CANCEL_PERMISSION = "jobs.cancel_job"


@admin.register(Recipient)
class RecipientAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "email", "owner", "relationship", "timezone", "muted_indefinitely", "muted_until")
    list_filter = ("muted_indefinitely", "relationship")
    search_fields = ("name", "email")
    raw_id_fields = ("owner",)


class DeliveryLogInline(admin.TabularInline):
    model = DeliveryLog
    extra = 0
    can_delete = False
    readonly_fields = ("attempt", "outcome", "error", "provider_response", "duration_ms", "created_at")

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class ReplyOnRecordFilter(admin.SimpleListFilter):
    """`sent` rows whose server reply was never recorded (notifications_sent_unconfirmed)."""

    title = "server reply on record"
    parameter_name = "reply"

    def lookups(self, request, model_admin):
        return [("missing", "Sent, reply missing (worker died after the commit point)")]

    def queryset(self, request, queryset):
        if self.value() == "missing":
            return queryset.filter(pk__in=selectors.notifications_sent_unconfirmed().values("pk"))
        return queryset


@admin.register(NotificationJob)
class NotificationJobAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "recipient",
        "notification_type",
        "delivery_method",
        "priority",
        "status",
        "retry_count",
        "scheduled_for",
        "created_at",
        "processed_at",
    )
    list_filter = ("status", ReplyOnRecordFilter, "notification_type", "delivery_method", "priority")
    search_fields = ("recipient__email", "recipient__name", "provider_message_id")
    raw_id_fields = ("owner", "recipient")
    list_select_related = ("recipient",)
    readonly_fields = ("provider_message_id", "procrastinate_job_id", "created_at", "started_at", "processed_at")
    inlines = [DeliveryLogInline]
    actions = ["retry_failed", "cancel_pending"]

    def _apply(self, request, queryset, service, wanted: str, verb: str) -> None:
        done = 0
        for notification in queryset.filter(status=wanted):
            try:
                service(notification=notification)
                done += 1
            except ApplicationError as exc:
                self.message_user(request, f"#{notification.id}: {exc.message}", messages.WARNING)
        self.message_user(request, f"{verb} {done} notification(s).", messages.SUCCESS)

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return user_may(request.user, RETRY_PERMISSION)

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return user_may(request.user, CANCEL_PERMISSION)

    @admin.action(description="Retry selected failed notifications", permissions=["retry"])
    def retry_failed(self, request, queryset) -> None:
        self._apply(request, queryset, services.notification_retry, Status.FAILED, "Re-queued")

    @admin.action(description="Cancel selected pending notifications", permissions=["cancel"])
    def cancel_pending(self, request, queryset) -> None:
        self._apply(request, queryset, services.notification_cancel, Status.PENDING, "Cancelled")


@admin.register(DeliveryLog)
class DeliveryLogAdmin(admin.ModelAdmin):
    list_display = ("id", "notification", "attempt", "outcome", "duration_ms", "created_at")
    list_filter = ("outcome", "notification__recipient")
    raw_id_fields = ("notification",)
