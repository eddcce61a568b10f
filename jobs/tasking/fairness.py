"""Fair claims between owners, and the one priority band that is not fair (staff and services).

Every job deferred through `job_defer` / `job_defer_bulk` gets a round when it is inserted
(`fair_round`), and the claim takes waiting jobs by round, then priority, then age
(jobs/engine/manager.py, migration 0009): one index walk, as cheap as the plain priority order,
however many jobs wait. It is start-time fair queueing, with the round given once at insert so
that the claim needs no sort.

- A line is (queue, owner, priority); jobs without an owner (periodic, maintenance) are one more
  owner. A job's round is the greatest of: the last round waiting in its line plus one; the
  queue's head (the lowest round waiting there, so a new line starts at the front rather than
  behind what is already there); the clock (the job id sequence divided by
  JOBS_FAIR_DEFERS_PER_ROUND, for a queue that was empty).
- So one owner's 20,000 queued e-mails take 20,000 rounds, and another owner's single job,
  in the head's round, is claimed in the next claim. Backlogged lines take turns job for job,
  and an owner whose line empties starts again at the head: a quiet owner never banks turns
  for later, a busy one is never owed them.
- Priorities below SERVICE_PRIORITY order only their owner's work: within a round, higher
  priority first, and each priority an owner uses is a line of its own, so their urgent job
  goes in the round of their next turn, ahead of their own backlog, never ahead of another
  user's turn; marking everything urgent gains nothing (one line either way). An owner with
  jobs at k priorities at once takes up to k turns a round (k <= 4 through the notifications
  API).
- Priorities from SERVICE_PRIORITY up are the service band: claimed before everything else,
  highest first, fairly between owners within one priority. Only code decides to use it (the
  stalled-job rescue, or an API for a staff caller, see notifications.models.job_priority);
  a user-facing API must never pass a user's choice through into it.
- Nothing waits for ever: a job's round never changes (a retry keeps it, so a retried job comes
  back at the front), and every job deferred later gets at least the clock's round, which
  passes any round after JOBS_FAIR_DEFERS_PER_ROUND defers per round.

Jobs inserted without a round (Procrastinate's own defer: periodic tasks; rows written by hand)
are claimed first within their band, by priority then age, the order before fair claims.
JOBS_FAIR_CLAIMS=false switches the claim back to priority then age for every job.
"""

from __future__ import annotations

from django.conf import settings

# The lowest priority of the service band. The claim orders by GREATEST(priority,
# SERVICE_PRIORITY - 1) first, so every priority below it is one band (migration 0009's index).
SERVICE_PRIORITY = 100


def defers_per_round() -> int:
    """How many defers, anywhere, move the clock by one round (JOBS_FAIR_DEFERS_PER_ROUND)."""
    return settings.JOBS_FAIR_DEFERS_PER_ROUND


# The round of a line's next job (migration 0018's function, planned without sorts): the
# greatest of the clock (the job id sequence's last value, read without a lock: never rolled
# back, so it only moves forward, in rounds), the queue's head (the lowest round waiting there,
# one step into migration 0009's head index; jobs put back for later, a retry or a schedule, are
# left out: an old round waiting for its time would hold every new line back to it) and the
# line's last round waiting plus one (one step down the lane index).
def first_round_sql(*, queue: str, owner: str, priority: str) -> str:
    """SQL for the round of the next job of a line (its later jobs of one statement take the
    rounds after it); the statement's parameters include `defers_per_round`."""
    return f"jobs_fair_first_round({queue}, {owner}, {priority}, %(defers_per_round)s::bigint)"
