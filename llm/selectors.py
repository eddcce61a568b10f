from __future__ import annotations

from decimal import Decimal

from django.db.models import Sum
from django.db.models.expressions import RawSQL

from llm.models import LlmUsage

# The budget's month is the database's (UTC), like the ledger's `created_at`: every worker
# agrees on it whatever its own clock says.
_MONTH_START = "date_trunc('month', now(), 'UTC')"


def llm_spend_this_month() -> Decimal:
    total = LlmUsage.objects.filter(created_at__gte=RawSQL(_MONTH_START, [])).aggregate(s=Sum("cost_usd"))
    return total["s"] or Decimal("0")
