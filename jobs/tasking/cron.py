"""Cron schedules in a time zone: when a periodic task is due, as absolute instants (epoch seconds).

    CronSchedule("0 2 * * FRI", "Europe/Paris").next_after(time.time())

The cron is read on the zone's wall clock, so `0 2 * * FRI` in Europe/Paris is 02:00 in Paris on
both sides of a DST change (00:00 UTC in summer, 01:00 UTC in winter). Procrastinate's own
periodic tasks read every cron in UTC (its issue 1472); the engine's periodic deferrer
(jobs/engine/periodic.py) asks this module instead. The instants are absolute, so every worker
computes the same `timestamp` for a run and Procrastinate's unique (task, periodic_id, timestamp)
still defers it once.

Twice a year a wall-clock time does not exist (spring forward: 02:30 on the last Sunday of March in
Paris) or happens twice (autumn: 02:30 on the last Sunday of October). The rules are Vixie cron's
(also what cronie, the cron of most Linux systems, does):

- A schedule at fixed times (a number, list or range in both the minute and the hour field, or
  @daily, @weekly, ...) runs once either way: a time that does not exist runs at the first instant
  that does (03:00 local, the end of the gap; several skipped times are one run), and a time that
  happens twice runs at its first occurrence only.
- A schedule with `*` in its minute or hour field (`*/15 * * * *`, `30 * * * *`, @hourly) follows
  the clock: a skipped time does not run and a repeated one runs at both occurrences, so an
  hourly task still runs once an hour of real time, neither twice within a few minutes nor with a
  two-hour hole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

# Longer than any DST shift (Lord Howe: 30 min; the largest anywhere is 2 h): how far back (or
# ahead) the search starts when a shift is near, so the second occurrence of a repeated time is seen.
_SHIFT_WINDOW = 3 * 3600
_MAX_STEPS = 200_000  # a guard only: croniter raises on a cron that never matches
_FIXED_ALIASES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight"}


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression (5 fields, or 6 with seconds last, as croniter reads them) on the wall
    clock of an IANA time zone. ValueError for a bad cron or an unknown zone."""

    cron: str
    timezone: str = "UTC"
    zone: ZoneInfo = field(init=False, repr=False, compare=False)
    follows_clock: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not croniter.is_valid(self.cron):
            raise ValueError(f"not a valid cron expression: {self.cron!r}")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone: {self.timezone!r} (an IANA name such as 'Europe/Paris')") from None
        fields = self.cron.split()
        if fields[0].startswith("@"):
            follows = fields[0] not in _FIXED_ALIASES
        else:
            follows = fields[0].startswith("*") or fields[1].startswith("*")
        object.__setattr__(self, "zone", zone)
        object.__setattr__(self, "follows_clock", follows)

    # --- the two questions the periodic deferrer asks ------------------------------------------
    def next_after(self, at: float) -> int:
        """The first run strictly after the instant `at`."""
        near_shift = self._offset(at) != self._offset(at + _SHIFT_WINDOW)
        start = self._wall(at - _SHIFT_WINDOW if near_shift else at)
        times = croniter(self.cron, start)
        best: int | None = None
        for _ in range(_MAX_STEPS):
            earliest, _latest, runs = self._resolve(times.get_next(datetime))
            for run in runs:
                if run > at and (best is None or run < best):
                    best = run
            # Every later wall time resolves to instants at or after `earliest`.
            if best is not None and earliest >= best:
                return best
        raise ValueError(f"{self.cron!r} has no run after {at}")

    def latest_at_or_before(self, at: float) -> int:
        """The last run at or before the instant `at`."""
        near_shift = self._offset(at - _SHIFT_WINDOW) != self._offset(at)
        start = self._wall(at + (_SHIFT_WINDOW if near_shift else 1))
        times = croniter(self.cron, start)
        best: int | None = None
        for _ in range(_MAX_STEPS):
            _earliest, latest, runs = self._resolve(times.get_prev(datetime))
            for run in runs:
                if run <= at and (best is None or run > best):
                    best = run
            if best is not None and latest <= best:
                return best
        raise ValueError(f"{self.cron!r} has no run before {at}")

    def runs_between(self, since: float, until: float) -> list[int]:
        """Every run in (since, until], in order."""
        runs = []
        run = self.next_after(since)
        while run <= until:
            runs.append(run)
            run = self.next_after(run)
        return runs

    # --- wall clock <-> instants ----------------------------------------------------------------
    def _offset(self, at: float) -> float:
        offset = datetime.fromtimestamp(at, self.zone).utcoffset()
        return offset.total_seconds() if offset is not None else 0.0

    def _wall(self, at: float) -> datetime:
        return datetime.fromtimestamp(at, self.zone).replace(tzinfo=None)

    def _resolve(self, wall: datetime) -> tuple[int, int, list[int]]:
        """(earliest, latest, runs) for a wall-clock time: the first and last instants it can
        mean (both monotonic in `wall`) and the runs it makes under the rules above."""
        first = int(wall.replace(tzinfo=self.zone, fold=0).timestamp())
        second = int(wall.replace(tzinfo=self.zone, fold=1).timestamp())
        if first == second:
            return first, first, [first]
        if first < second:  # happens twice: `first` before the clocks go back, `second` after
            return first, second, [first, second] if self.follows_clock else [first]
        # Does not exist (fold=0 read it with the offset before the gap, fold=1 with the one
        # after): the gap ends at the transition, the first instant after `wall` on the clock.
        end = self._transition(second, first)
        return end, end, [] if self.follows_clock else [end]

    def _transition(self, before: int, after: int) -> int:
        """The first second in (before, after] whose offset is the one after the transition."""
        target = self._offset(after)
        while after - before > 1:
            middle = (before + after) // 2
            if self._offset(middle) == target:
                after = middle
            else:
                before = middle
        return after
