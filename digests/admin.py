from django.contrib import admin

from digests.models import RecipientDigestSchedule, WeeklyDigest


@admin.register(RecipientDigestSchedule)
class RecipientDigestScheduleAdmin(admin.ModelAdmin):
    list_display = ("id", "recipient", "frequency", "delivery_time", "delivery_day", "timezone", "active")
    list_display += ("last_digest_sent", "next_digest_scheduled")
    list_filter = ("frequency", "active")
    raw_id_fields = ("owner", "recipient")
    readonly_fields = ("last_digest_sent", "next_digest_scheduled", "last_note_xid", "last_note_id")


@admin.register(WeeklyDigest)
class WeeklyDigestAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "period_start", "period_end", "ai_generated", "note_count", "cost_usd")
    list_filter = ("ai_generated",)
    raw_id_fields = ("owner",)
    date_hierarchy = "period_end"
