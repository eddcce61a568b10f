from django.contrib import admin

from llm.models import LlmUsage


@admin.register(LlmUsage)
class LlmUsageAdmin(admin.ModelAdmin):
    list_display = ("created_at", "purpose", "model", "input_tokens", "output_tokens", "cost_usd", "estimated", "owner")
    list_filter = ("purpose", "model", "estimated")
    date_hierarchy = "created_at"
