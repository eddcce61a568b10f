"""Procrastinate's periodic deferrer, reading each cron on its task's time zone.

Stock Procrastinate reads every cron in UTC (croniter on epoch seconds, its issue 1472). Here the
times come from the task's `CronSchedule` (jobs/tasking/cron.py: `job_task(cron=, timezone=)`),
which turns the zone's wall clock into absolute epoch seconds, with the DST rules written there.
The rest is Procrastinate's: `get_previous_tasks` (what is due since the last defer, or the last
run within `max_delay` at start-up), `defer_jobs` (the insert that Procrastinate's unique
periodic_id + timestamp makes happen once across every worker) and `wait`.

The database's clock rules: every tick, the deferrer reads the database's time and decides what
is due on it (`clock` plus the offset of the database's clock from this host's), so workers on
hosts whose clocks are tens of seconds apart all defer a run at its time, never early because one
host's clock is ahead (each run is still deferred once: the unique row). `clock` is the local
time source: the tests move it to a DST change instead of waiting for one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from procrastinate.connector import BaseConnector
from procrastinate.periodic import PeriodicDeferrer, PeriodicTask

from jobs.tasking.cron import CronSchedule
from jobs.tasking.registry import periodic_schedule

logger = logging.getLogger(__name__)


def clock() -> float:
    return time.time()


def schedule_of(periodic_task: PeriodicTask) -> CronSchedule:
    return periodic_schedule(periodic_task.task.name, periodic_task.periodic_id, periodic_task.cron)


# The database's time, with this host's at the same instant: their difference is the offset.
_DATABASE_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8 AS now"


class ZonedPeriodicDeferrer(PeriodicDeferrer):
    def __init__(self, *, connector: BaseConnector, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connector = connector

    async def database_offset(self) -> float:
        """Seconds the database's clock is ahead of this host's (negative: behind), read against
        this host's time once the answer is in: a slow round trip makes the deferrer late by it,
        never early."""
        row = await self.connector.execute_query_one_async(query=_DATABASE_NOW)
        return float(row["now"]) - time.time()

    async def worker(self) -> None:
        if not self.registry.periodic_tasks:
            logger.info(
                "No periodic task found, periodic deferrer will not run.",
                extra={"action": "periodic_deferrer_no_task"},
            )
            return
        while True:
            now = clock() + await self.database_offset()
            await self.defer_jobs(jobs_to_defer=self.get_previous_tasks(at=now))
            await self.wait(next_tick=self.get_next_tick(at=now))

    def get_next_tick(self, at: float) -> float:
        """Seconds until the next periodic task is due."""
        return min(schedule_of(pt).next_after(at) for pt in self.registry.periodic_tasks.values()) - at

    def get_timestamps(self, periodic_task: PeriodicTask, since: int | None, until: float) -> Iterable[int]:
        """The runs of `periodic_task` to defer now: every one in (since, until], or at start-up
        (`since` None) the last one, unless it is older than `max_delay`."""
        schedule = schedule_of(periodic_task)
        if since:
            yield from schedule.runs_between(since, until)
            return
        timestamp = schedule.latest_at_or_before(until)
        delay = until - timestamp
        if delay > self.max_delay:
            logger.debug(
                f"Ignoring periodic task {periodic_task.task.name} scheduled more than {self.max_delay} s ago"
                f" ({delay:.0f} s)",
                extra={
                    "task": periodic_task.task.name,
                    "periodic_id": periodic_task.periodic_id,
                    "action": "ignore_periodic_task",
                    "max_delay": self.max_delay,
                    "delay": delay,
                },
            )
            return
        yield timestamp
