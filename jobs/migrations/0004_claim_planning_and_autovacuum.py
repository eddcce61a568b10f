"""What keeps the batched claim (jobs/manager.py) on the priority index under prepared
statements, and autovacuum close behind the hot job tables.

- `jobs_queue_paused(queue)`: a function the planner cannot see into. Written as a join or an
  array test, the paused-queue filter looks so selective to the planner (one queue name, one
  distinct value) that the generic plan of the claim sorted every waiting job on each fetch.
- The job and event tables change constantly: vacuum and analyze them after 2% (5%) of their
  rows changed instead of PostgreSQL's 20% (10%), so dead rows do not pile up and the planner's
  statistics follow a queue that goes from empty to 100,000 waiting jobs in seconds.
"""

from django.db import migrations

FORWARD = """
CREATE FUNCTION jobs_queue_paused(queue varchar) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM jobs_paused_queues WHERE queue_name = queue);
END;
$$;
ALTER TABLE procrastinate_jobs SET (
    autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 1
);
ALTER TABLE procrastinate_events SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE jobs_job_info SET (autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05);
"""

BACKWARD = """
DROP FUNCTION jobs_queue_paused(varchar);
ALTER TABLE procrastinate_jobs RESET (
    autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor, autovacuum_vacuum_cost_delay
);
ALTER TABLE procrastinate_events RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor);
ALTER TABLE jobs_job_info RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor);
"""


class Migration(migrations.Migration):
    dependencies = [("jobs", "0003_statement_level_triggers")]

    operations = [migrations.RunSQL(sql=FORWARD, reverse_sql=BACKWARD)]
