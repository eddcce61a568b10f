"""A job's events go with it through one statement-level trigger instead of a foreign key.

Procrastinate's `procrastinate_events.job_id` references `procrastinate_jobs ON DELETE CASCADE`.
A foreign key checks every row inserted into the events table against the jobs table: one
lookup (a row lock, `FOR KEY SHARE`) per event, and every job writes three events (deferred,
started, its end) whose job the same statement has just written or locked. In a bulk defer the
checks were about a sixth of PostgreSQL's time per job (bench: 20.0 against 17.0 us of CPU per
job for 1,000-row bulk inserts without the constraint), and the cascade deletes a job's events
one job at a time.

The constraint is dropped, and an AFTER DELETE statement trigger deletes the deleted jobs'
events in one statement (by `procrastinate_events_job_id_fkey_v1`, the index on job_id, planned
with sequential scans off so that a large events table is never read whole). Events are written
only by the jobs' own triggers and Procrastinate's statements on a job row they hold, so no event
can name a job that a concurrent statement deletes. A TRUNCATE of the jobs no longer empties the
events: truncate both (tests/conftest.py, bench/harness.py do).
"""

from django.db import migrations

FORWARD = """
ALTER TABLE procrastinate_events DROP CONSTRAINT procrastinate_events_job_id_fkey;

CREATE FUNCTION jobs_events_after_jobs_deleted() RETURNS trigger LANGUAGE plpgsql
SET enable_seqscan = off AS $$
BEGIN
    DELETE FROM procrastinate_events WHERE job_id = ANY (ARRAY(SELECT id FROM old_rows));
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_events_after_jobs_deleted
    AFTER DELETE ON procrastinate_jobs REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_events_after_jobs_deleted();
"""

BACKWARD = """
DROP TRIGGER jobs_events_after_jobs_deleted ON procrastinate_jobs;
DROP FUNCTION jobs_events_after_jobs_deleted();
DELETE FROM procrastinate_events AS event
 WHERE NOT EXISTS (SELECT 1 FROM procrastinate_jobs AS job WHERE job.id = event.job_id);
ALTER TABLE procrastinate_events ADD CONSTRAINT procrastinate_events_job_id_fkey
    FOREIGN KEY (job_id) REFERENCES procrastinate_jobs (id) ON DELETE CASCADE;
"""


class Migration(migrations.Migration):
    dependencies = [("jobs", "0018_fair_round_planned_without_sorts")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
