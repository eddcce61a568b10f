"""core/quotas.py: daily counters taken all or nothing, settled, and purged after their day."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from core import services
from core.models import QuotaCounter
from core.quotas import quota_adjust, quota_take

pytestmark = pytest.mark.django_db


def test_takes_are_all_or_nothing_up_to_the_limit():
    assert quota_take(key="k", amount=2, limit=3).allowed
    refused = quota_take(key="k", amount=2, limit=3)
    assert not refused.allowed and refused.used == 2 and 0 < refused.retry_after <= 86400
    assert quota_take(key="k", amount=1, limit=3).used == 3
    assert not quota_take(key="other", amount=4, limit=3).allowed  # more than the limit at once
    assert not QuotaCounter.objects.filter(key="other").exists()


def test_adjust_settles_a_take_and_never_goes_below_zero():
    taken = quota_take(key="usd", amount=Decimal("0.5"), limit=1)
    quota_adjust(key="usd", day=taken.day, delta=Decimal("-0.2"))
    assert QuotaCounter.objects.get(key="usd").used == Decimal("0.3")
    quota_adjust(key="usd", day=taken.day, delta=-5)
    assert QuotaCounter.objects.get(key="usd").used == 0


def test_the_periodic_purge_drops_counters_of_days_before_yesterday():
    today = quota_take(key="k", amount=1, limit=10).day
    for age in (1, 2, 30):
        QuotaCounter.objects.create(key="k", day=today - timedelta(days=age), used=1)

    assert services.expired_rows_purge()["quota_counters"] == 2

    assert sorted((today - c.day).days for c in QuotaCounter.objects.all()) == [0, 1]
