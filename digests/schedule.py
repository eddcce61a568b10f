"""When is the next digest due? Wall-clock rules in the recipient's time zone, answered in UTC.

- daily: every day at `delivery_time`; weekly: on ISO weekday `delivery_day` (Monday = 1);
  monthly: on day `delivery_day`, or the month's last day when it is shorter.
- A wall time that does not exist (spring forward) happens at the first valid instant after
  the gap; a wall time that exists twice (fall back) happens at its first occurrence only.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

DAILY, WEEKLY, MONTHLY = "daily", "weekly", "monthly"


def _candidate_dates(frequency: str, delivery_day: int | None, start: date):
    day = start
    for _ in range(800):
        if frequency == DAILY or (frequency == WEEKLY and day.isoweekday() == delivery_day):
            yield day
        elif frequency == MONTHLY:
            last = calendar.monthrange(day.year, day.month)[1]
            if day.day == min(delivery_day, last):
                yield day
        day += timedelta(days=1)


def local_to_utc(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of a local wall time, resolving DST gaps and folds as documented."""
    naive = datetime.combine(day, at)
    first = naive.replace(tzinfo=tz, fold=0)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive:
        return first.astimezone(UTC)  # exists (fold=0 is the first of two in a fold)
    # In a gap: the transition lies between the two readings; find it to the second.
    low = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = first.astimezone(UTC)
    low, high = min(low, high), max(low, high)
    offset_before = low.astimezone(tz).utcoffset()
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(tz).utcoffset() == offset_before:
            low = middle
        else:
            high = middle
    return high.replace(microsecond=0)


def next_run(
    *, frequency: str, delivery_time: time, delivery_day: int | None, timezone: str, after: datetime
) -> datetime:
    """The first delivery strictly after `after` (aware), as an aware UTC datetime."""
    tz = ZoneInfo(timezone)
    start = after.astimezone(tz).date() - timedelta(days=1)  # a gap can move a run before midnight
    for day in _candidate_dates(frequency, delivery_day, start):
        at = local_to_utc(day, delivery_time, tz)
        if at > after:
            return at
    raise ValueError("no delivery in the next two years")  # unreachable for valid rules
