"""Fair claims between owners, and the one priority band that is not fair (staff and services).

Every job deferred through `job_defer` / `job_defer_bulk` gets a rank when it is inserted, and
the claim takes waiting jobs in rank order (jobs/engine/manager.py, migration 0010): one index
walk, as cheap as the plain priority order, however many jobs wait. It is start-time fair
queueing, with the rank given once at insert so that the claim needs no sort.

- A line is (queue, owner, priority); jobs without an owner (periodic, maintenance) are one more
  owner. A job's rank is the greatest of: the last rank waiting in its line plus a turn
  (JOBS_FAIR_TURN); the queue's head (the lowest rank waiting there, so a new line starts at
  the front rather than behind what is already there); the clock (the job id sequence, which
  moves by one for every job deferred anywhere, for when the queue is empty).
- So one owner's 20,000 queued e-mails are spread a turn apart, and another owner's single job,
  ranked at the head, is claimed in the next claim. Backlogged lines take turns job for job
  (their ranks interleave), and an owner whose line empties starts again at the head: a quiet
  owner never banks turns for later, a busy one is never owed them.
- Nothing waits for ever: a job's rank never changes (a retry keeps it), and every job deferred
  later ranks at least at the head and the clock; the clock passes any rank after that many
  more defers.
- Priorities below SERVICE_PRIORITY order only their owner's work: each priority an owner uses
  is a line of its own, so their urgent job does not wait behind their own backlog of normal
  ones, and marking everything urgent gains nothing over marking nothing (one line either way).
  An owner with jobs at k priorities at once takes up to k turns a round (k <= 4 through the
  notifications API).
- Priorities from SERVICE_PRIORITY up are the service band: claimed before everything else,
  highest first, fairly between owners within one priority. Only code decides to use it (the
  stalled-job rescue, or an API for a staff caller, see notifications.models.job_priority);
  a user-facing API must never pass a user's choice through into it.

Jobs inserted without a rank (Procrastinate's own defer: periodic tasks; rows written by hand)
are claimed first within their band, by priority then age, the order before fair claims.
JOBS_FAIR_CLAIMS=false switches the claim back to priority then age for every job.
"""

from __future__ import annotations

from django.conf import settings

# The lowest priority of the service band. The claim orders by GREATEST(priority,
# SERVICE_PRIORITY - 1) first, so every priority below it is one band (migration 0010's index).
SERVICE_PRIORITY = 100


def fair_turn() -> int:
    """How far apart in rank the jobs of one line are (JOBS_FAIR_TURN, 1,000,000 by default): a
    job deferred N defers after a line's backlog is behind at most N / turn jobs of that line."""
    return settings.JOBS_FAIR_TURN


# The clock: the job id sequence's last value, read without a lock (never rolled back, so it
# only moves forward).
_CLOCK = "(SELECT last_value FROM procrastinate_jobs_id_seq)"

# The last rank waiting in a line: one step down migration 0010's lane index.
LANE_LAST_RANK = """(
    SELECT lane.fair_rank FROM procrastinate_jobs AS lane
     WHERE lane.status = 'todo' AND lane.fair_rank IS NOT NULL
       AND lane.queue_name = {queue} AND COALESCE(lane.owner_id, 0) = COALESCE({owner}, 0)
       AND lane.priority = {priority}
     ORDER BY lane.fair_rank DESC LIMIT 1
)"""


# The queue's head: the lowest rank waiting there (one step into migration 0010's head index).
# Jobs put back for later (a retry, a schedule) are left out: an old rank waiting for its time
# would hold every new line back to it.
QUEUE_HEAD_RANK = """(
    SELECT head.fair_rank FROM procrastinate_jobs AS head
     WHERE head.status = 'todo' AND head.fair_rank IS NOT NULL AND head.scheduled_at IS NULL
       AND head.queue_name = {queue}
     ORDER BY head.fair_rank LIMIT 1
)"""


def first_rank_sql(*, queue: str, owner: str, priority: str) -> str:
    """SQL for the rank of the next job of a line (its later jobs of one statement follow a turn
    apart); the statement's parameters include `fair_turn` (fair_turn())."""
    last = LANE_LAST_RANK.format(queue=queue, owner=owner, priority=priority)
    head = QUEUE_HEAD_RANK.format(queue=queue)
    return f"GREATEST({_CLOCK}, {head}, {last} + %(fair_turn)s)"
