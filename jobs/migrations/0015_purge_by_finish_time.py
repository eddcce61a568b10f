"""The purge finds finished jobs by the time they finished, not by walking every job.

`jobs_purge` (jobs/console/services.py) took the jobs of a status in id order and computed each
one's last event: with a backlog, every purge batch that came up short (the last of each run)
walked every waiting job of the table, 1,000,000 rows at a million queued (bench/soak.py: the
purge was the costliest statement of the soak, about 250 µs of PostgreSQL per job).

- `jobs_events_finished_idx`: the finishing events (succeeded, failed, cancelled, aborted: what
  jobs_after_jobs_updated, migration 0003, writes when a job ends) by time. The purge walks it
  from the oldest up to its retention's cutoff and stops there: it reads only what it deletes
  (and the finished jobs of queues kept longer than the shortest retention).
- One more index entry per finished job, none per waiting or running one.
- Built CONCURRENTLY (so outside a transaction): the events table of a running system is large
  and keeps being written.
"""

from django.db import migrations

FORWARD = """
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_events_finished_idx ON procrastinate_events (at, job_id)
 WHERE type IN ('succeeded', 'failed', 'cancelled', 'aborted');
"""

BACKWARD = "DROP INDEX CONCURRENTLY IF EXISTS jobs_events_finished_idx;"


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("jobs", "0014_worker_hosts")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
