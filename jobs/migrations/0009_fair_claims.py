"""Fair claims between owners (jobs/tasking/fairness.py): the owner and the fair round of each job,
on procrastinate_jobs itself, and the three indexes that keep the claim and the defer index walks.

- `owner_id`: a copy of jobs_job_info.owner_id (set by the same defer statement). The defer
  finds the last waiting job of the owner's line with one step down an index; through a join
  it would read every job the owner ever had. Nullable, no default: adding it is instant.
- `fair_round`: the job's round in the fair order, computed once when it is deferred. NULL for
  jobs inserted by Procrastinate's own SQL (periodic tasks) and for jobs already waiting when
  this migration runs: those are claimed first within their band, by priority then age, the
  order they had before.
- `jobs_fair_claim_idx`: the claim's order (service band, round, priority, age) over waiting
  jobs, so a claim of N jobs reads about N index entries, as with Procrastinate's priority
  index (kept: JOBS_FAIR_CLAIMS=false claims in its order).
- `jobs_fair_lane_idx`: (queue, owner, priority, round) of waiting jobs with a round, for the
  defer's "last round waiting in this line" (a backward step, whatever the owner's backlog).
- `jobs_fair_head_idx`: (queue, round) of waiting jobs with a round not put back for later,
  for the defer's "lowest round waiting in this queue" (one step).
The three partial indexes hold only `todo` rows: they cost an insert when a job is deferred.
"""

from django.db import migrations

FORWARD = """
ALTER TABLE procrastinate_jobs ADD COLUMN owner_id bigint, ADD COLUMN fair_round bigint;
UPDATE procrastinate_jobs AS job SET owner_id = info.owner_id
  FROM jobs_job_info AS info
 WHERE info.job_id = job.id AND info.owner_id IS NOT NULL AND job.status IN ('todo', 'doing');
CREATE INDEX jobs_fair_claim_idx ON procrastinate_jobs
    (GREATEST(priority, 99) DESC, fair_round ASC NULLS FIRST, priority DESC, id ASC)
    WHERE status = 'todo';
CREATE INDEX jobs_fair_lane_idx ON procrastinate_jobs (queue_name, COALESCE(owner_id, 0), priority, fair_round)
    WHERE status = 'todo' AND fair_round IS NOT NULL;
CREATE INDEX jobs_fair_head_idx ON procrastinate_jobs (queue_name, fair_round)
    WHERE status = 'todo' AND fair_round IS NOT NULL AND scheduled_at IS NULL;
"""

BACKWARD = """
DROP INDEX jobs_fair_head_idx;
DROP INDEX jobs_fair_lane_idx;
DROP INDEX jobs_fair_claim_idx;
ALTER TABLE procrastinate_jobs DROP COLUMN fair_round, DROP COLUMN owner_id;
"""


class Migration(migrations.Migration):
    dependencies = [("jobs", "0008_dependencies_and_batches")]

    operations = [migrations.RunSQL(sql=FORWARD, reverse_sql=BACKWARD)]
