from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from django.db.models import Sum
from django.utils import timezone

from llm.models import LlmUsage


def month_start(now: datetime | None = None) -> datetime:
    now = now or timezone.now()
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def llm_spend_this_month(*, now: datetime | None = None) -> Decimal:
    total = LlmUsage.objects.filter(created_at__gte=month_start(now)).aggregate(s=Sum("cost_usd"))
    return total["s"] or Decimal("0")
