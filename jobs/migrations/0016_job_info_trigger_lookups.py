"""The end trigger's lookups of jobs_job_info read only the rows they are after.

`jobs_after_jobs_updated` (migration 0006) joins the ended jobs with jobs_job_info twice: the
watched jobs (a client streams them: NOTIFY) and those with a completion webhook. Under
statistics that say the table is empty (after ANALYZE of a drained system) PostgreSQL read every
row of the table for each batch of ends, both times: in tests/jobs/test_claim.py, 120,000 rows
for ten batches of ten ends with 3,000 rows kept.

- Two partial indexes hold only the rows either lookup wants. Built CONCURRENTLY: the table of a
  running system is large and keeps being written.
- The trigger function plans with sequential scans off (a function's SET applies while it runs):
  with the indexes alone the planner still chose a sequential scan of the "empty" table. Its
  statements read the transition tables (no sequential scan to disable) and look rows up by key.
  A later CREATE OR REPLACE of the function must repeat `SET enable_seqscan = off`.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("jobs", "0015_purge_by_finish_time")]

    operations = [
        AddIndexConcurrently(
            model_name="jobinfo",
            index=models.Index(fields=["job"], name="jobs_info_watched", condition=models.Q(watched=True)),
        ),
        AddIndexConcurrently(
            model_name="jobinfo",
            index=models.Index(fields=["job"], name="jobs_info_callback", condition=~models.Q(callback_url="")),
        ),
        migrations.RunSQL(
            "ALTER FUNCTION jobs_after_jobs_updated() SET enable_seqscan = off",
            "ALTER FUNCTION jobs_after_jobs_updated() RESET enable_seqscan",
        ),
    ]
