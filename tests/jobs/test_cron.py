"""Cron schedules in a time zone (jobs/tasking/cron.py): pure computations of when a periodic task
is due, across both DST changes. Europe/Paris in 2026: clocks go forward on Sunday 29 March at
02:00 (01:00 UTC) and back on Sunday 25 October at 03:00 (01:00 UTC)."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime

import pytest

from jobs.tasking.cron import CronSchedule
from jobs.tasking.registry import job_task


def at(*fields: int) -> int:
    return int(datetime(*fields, tzinfo=UTC).timestamp())


def utc(timestamps: list[int]) -> list[str]:
    return [datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M") for t in timestamps]


def test_friday_two_oclock_in_paris_is_local_time_on_both_sides_of_each_change():
    schedule = CronSchedule("0 2 * * FRI", "Europe/Paris")
    assert utc(schedule.runs_between(at(2026, 3, 15), at(2026, 4, 5))) == ["03-20 01:00", "03-27 01:00", "04-03 00:00"]
    autumn = schedule.runs_between(at(2026, 10, 15), at(2026, 11, 5))
    assert utc(autumn) == ["10-16 00:00", "10-23 00:00", "10-30 01:00"]


def test_utc_is_the_default_and_matches_procrastinate():
    schedule = CronSchedule("0 2 * * FRI")
    assert utc(schedule.runs_between(at(2026, 3, 15), at(2026, 4, 5))) == ["03-20 02:00", "03-27 02:00", "04-03 02:00"]


def test_a_time_skipped_in_spring_runs_once_at_the_end_of_the_gap():
    schedule = CronSchedule("30 2 * * *", "Europe/Paris")  # 02:30 does not exist on 29 March
    assert utc(schedule.runs_between(at(2026, 3, 28), at(2026, 3, 31))) == ["03-28 01:30", "03-29 01:00", "03-30 00:30"]
    # Several skipped times are one run: 02:00, 02:15, 02:30 and 02:45 all at 03:00 local.
    quarters = CronSchedule("0,15,30,45 2 * * *", "Europe/Paris")
    assert utc(quarters.runs_between(at(2026, 3, 29), at(2026, 3, 29, 12))) == ["03-29 01:00"]


def test_a_time_repeated_in_autumn_runs_once_at_its_first_occurrence():
    schedule = CronSchedule("30 2 * * *", "Europe/Paris")  # 02:30 happens at 00:30 and 01:30 UTC on 25 October
    runs = schedule.runs_between(at(2026, 10, 24), at(2026, 10, 27))
    assert utc(runs) == ["10-24 00:30", "10-25 00:30", "10-26 01:30"]


def test_an_hourly_schedule_follows_the_clock_and_keeps_one_run_an_hour():
    schedule = CronSchedule("30 * * * *", "Europe/Paris")
    spring = schedule.runs_between(at(2026, 3, 28, 23), at(2026, 3, 29, 3))
    assert utc(spring) == ["03-28 23:30", "03-29 00:30", "03-29 01:30", "03-29 02:30"]  # no 02:30 local: not run
    autumn = schedule.runs_between(at(2026, 10, 24, 23), at(2026, 10, 25, 3))
    assert utc(autumn) == ["10-24 23:30", "10-25 00:30", "10-25 01:30", "10-25 02:30"]  # 02:30 local twice: both


def test_the_last_run_before_an_instant_applies_the_same_rules():
    daily = CronSchedule("30 2 * * *", "Europe/Paris")
    assert utc([daily.latest_at_or_before(at(2026, 3, 29, 1, 5))]) == ["03-29 01:00"]
    assert utc([daily.latest_at_or_before(at(2026, 10, 25, 1, 45))]) == ["10-25 00:30"]
    hourly = CronSchedule("30 * * * *", "Europe/Paris")
    assert utc([hourly.latest_at_or_before(at(2026, 10, 25, 1, 45))]) == ["10-25 01:30"]
    assert daily.latest_at_or_before(at(2026, 10, 25, 0, 30)) == at(2026, 10, 25, 0, 30)  # at the instant: included


def test_next_after_is_strictly_after():
    schedule = CronSchedule("0 2 * * FRI", "Europe/Paris")
    assert schedule.next_after(at(2026, 3, 27, 1)) == at(2026, 4, 3, 0)


@pytest.mark.parametrize(
    ("cron", "zone", "message"),
    [
        ("0 2 * * FRI", "Europe/Pariss", "unknown time zone: 'Europe/Pariss'"),
        ("0 2 * *", "UTC", "not a valid cron expression: '0 2 * *'"),
    ],
)
def test_a_bad_schedule_fails_at_declaration_naming_the_task(cron, zone, message):
    with pytest.raises(ValueError, match=re.escape(f"task tests.never_registered: {message}")):
        job_task(name="tests.never_registered", queue="maintenance", cron=cron, timezone=zone, periodic_id="x")


def test_a_time_zone_without_a_cron_is_refused():
    with pytest.raises(ValueError, match=r"tests\.never_registered: periodic_id and timezone go with cron"):
        job_task(name="tests.never_registered", queue="maintenance", timezone="Europe/Paris")


# Two days around each change of a few zones: Paris and New York (1 h), Lord Howe (30 min).
CHANGES = [
    ("Europe/Paris", at(2026, 3, 29, 1)),
    ("Europe/Paris", at(2026, 10, 25, 1)),
    ("America/New_York", at(2026, 3, 8, 7)),
    ("America/New_York", at(2026, 11, 1, 6)),
    ("Australia/Lord_Howe", at(2026, 4, 4, 15)),
    ("Australia/Lord_Howe", at(2026, 10, 3, 15, 30)),
]


@pytest.mark.parametrize(("zone", "change"), CHANGES)
@pytest.mark.parametrize("cron", ["30 2 * * *", "0,30 1-3 * * *", "*/20 * * * *", "45 * * * *", "0 0 * * *"])
def test_next_and_latest_agree_with_the_list_of_runs_around_a_change(zone, change, cron):
    schedule = CronSchedule(cron, zone)
    start, end = change - 86400, change + 86400
    runs = schedule.runs_between(start - 2 * 86400, end + 2 * 86400)  # a daily run on each side
    assert runs == sorted(set(runs)), "a run twice, or out of order"
    for instant in range(start, end, 7 * 60 + 13):  # not on the runs' minutes only
        assert schedule.next_after(instant) == min(r for r in runs if r > instant)
        assert schedule.latest_at_or_before(instant) == max(r for r in runs if r <= instant)
    for run in runs:
        assert schedule.latest_at_or_before(run) == run


@pytest.mark.parametrize(("zone", "change"), CHANGES[:4])
def test_a_schedule_that_follows_the_clock_keeps_its_real_spacing_over_a_one_hour_change(zone, change):
    runs = CronSchedule("*/20 * * * *", zone).runs_between(change - 86400, change + 86400)
    assert {b - a for a, b in itertools.pairwise(runs)} == {1200}


@pytest.mark.parametrize(("zone", "change"), CHANGES)
def test_a_daily_schedule_runs_once_every_local_day_across_a_change(zone, change):
    schedule = CronSchedule("30 2 * * *", zone)
    runs = schedule.runs_between(change - 3 * 86400, change + 3 * 86400)
    days = [datetime.fromtimestamp(run, schedule.zone).date() for run in runs]
    assert len(days) == len(set(days)), "a day with two runs"
    assert (days[-1] - days[0]).days == len(days) - 1 >= 4, "a day without a run"
