"""Time travel: "now" is passed explicitly, across DST changes in two time zones."""

from __future__ import annotations

from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest

from digests.schedule import next_run

PARIS = "Europe/Paris"  # spring forward 2026-03-29 02:00 -> 03:00, fall back 2026-10-25 03:00 -> 02:00
NEW_YORK = "America/New_York"  # spring forward 2026-03-08 02:00 -> 03:00, fall back 2026-11-01 02:00 -> 01:00


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(tz: str, *args) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(tz))


def runs(after: datetime, n: int, **rule) -> list[datetime]:
    out = []
    for _ in range(n):
        after = next_run(after=after, **rule)
        out.append(after)
    return out


def test_daily_in_local_time_across_spring_forward_in_paris():
    rule = {"frequency": "daily", "delivery_time": time(8, 0), "delivery_day": None, "timezone": PARIS}
    got = runs(utc(2026, 3, 27, 12), 3, **rule)
    # 08:00 local every day: 07:00 UTC before the change, 06:00 UTC after.
    assert got == [utc(2026, 3, 28, 7), utc(2026, 3, 29, 6), utc(2026, 3, 30, 6)]


def test_a_time_in_the_spring_forward_gap_happens_once_at_the_first_valid_instant():
    for tz, gap_day, transition_utc in ((PARIS, 29, utc(2026, 3, 29, 1)), (NEW_YORK, 8, utc(2026, 3, 8, 7))):
        rule = {"frequency": "daily", "delivery_time": time(2, 30), "delivery_day": None, "timezone": tz}
        got = runs(local(tz, 2026, 3, gap_day - 1, 12, 0), 3, **rule)
        assert got[0] == transition_utc  # 03:00 local, the first instant after the gap
        assert got[0].astimezone(ZoneInfo(tz)).time() == time(3, 0)
        assert [g.astimezone(ZoneInfo(tz)).time() for g in got[1:]] == [time(2, 30), time(2, 30)]
        assert len({g.astimezone(ZoneInfo(tz)).date() for g in got}) == 3  # once per day


@pytest.mark.parametrize(
    ("tz", "at", "day_before", "fold_day"),
    [
        (NEW_YORK, time(1, 30), (2026, 10, 31, 12), (2026, 11, 1)),
        (PARIS, time(2, 30), (2026, 10, 24, 12), (2026, 10, 25)),
    ],
)
def test_a_time_in_the_fall_back_fold_happens_once(tz, at, day_before, fold_day):
    rule = {"frequency": "daily", "delivery_time": at, "delivery_day": None, "timezone": tz}
    first = next_run(after=local(tz, *day_before), **rule)
    second = next_run(after=first, **rule)
    assert first.astimezone(ZoneInfo(tz)).date().timetuple()[:3] == fold_day
    assert (second - first).total_seconds() == 25 * 3600  # next day, not again an hour later


def test_weekly_on_the_local_weekday_across_the_new_york_change():
    rule = {"frequency": "weekly", "delivery_time": time(9, 15), "delivery_day": 1, "timezone": NEW_YORK}
    got = runs(utc(2026, 2, 25), 3, **rule)
    assert [g.astimezone(ZoneInfo(NEW_YORK)).isoweekday() for g in got] == [1, 1, 1]
    assert got == [utc(2026, 3, 2, 14, 15), utc(2026, 3, 9, 13, 15), utc(2026, 3, 16, 13, 15)]


def test_weekly_is_strictly_after_now():
    rule = {"frequency": "weekly", "delivery_time": time(9, 0), "delivery_day": 5, "timezone": "UTC"}
    friday_nine = utc(2026, 11, 27, 9, 0)
    assert next_run(after=friday_nine, **rule) == utc(2026, 12, 4, 9, 0)
    assert next_run(after=utc(2026, 11, 27, 8, 59), **rule) == friday_nine


def test_monthly_day_31_falls_on_the_last_day_of_shorter_months():
    rule = {"frequency": "monthly", "delivery_time": time(18, 0), "delivery_day": 31, "timezone": PARIS}
    got = runs(utc(2026, 1, 1), 5, **rule)
    assert [g.astimezone(ZoneInfo(PARIS)).date().isoformat() for g in got] == [
        "2026-01-31",
        "2026-02-28",
        "2026-03-31",
        "2026-04-30",
        "2026-05-31",
    ]
    leap = next_run(after=utc(2028, 2, 1), **rule)
    assert leap.astimezone(ZoneInfo(PARIS)).date().isoformat() == "2028-02-29"


@pytest.mark.parametrize(("day", "expected"), [(1, "2026-03-01"), (15, "2026-02-15"), (30, "2026-02-28")])
def test_monthly_on_other_days(day, expected):
    rule = {"frequency": "monthly", "delivery_time": time(0, 0), "delivery_day": day, "timezone": "UTC"}
    assert next_run(after=utc(2026, 2, 10), **rule).date().isoformat() == expected
