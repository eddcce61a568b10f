from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db.models import Sum
from django.db.models.expressions import RawSQL

from llm.models import LlmUsage, LlmUsageCounter

# The budget's month is the database's (UTC), like the ledger's `created_at`: every worker
# agrees on it whatever its own clock says.
_MONTH_START = "date_trunc('month', now(), 'UTC')"


def llm_spend_this_month() -> Decimal:
    total = LlmUsage.objects.filter(created_at__gte=RawSQL(_MONTH_START, [])).aggregate(s=Sum("cost_usd"))
    return total["s"] or Decimal("0")


def llm_budget_usd() -> Decimal:
    return Decimal(str(settings.LLM_MONTHLY_BUDGET_USD))


def llm_usage_totals() -> list[dict]:
    """The ledger's totals by purpose and model for /metrics ({purpose, model, calls,
    input_tokens, output_tokens, cost_usd}): the trigger-kept counters (migration 0004), a few
    rows however long the ledger, and deleted ledger rows still count."""
    return list(
        LlmUsageCounter.objects.values("purpose", "model")
        .annotate(
            calls=Sum("calls"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cost_usd=Sum("cost_usd"),
        )
        .order_by("purpose", "model")
    )
