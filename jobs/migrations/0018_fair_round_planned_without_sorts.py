"""The round of a deferred job is computed by a function planned without sorts.

A job's round (jobs/tasking/fairness.py) looks up its queue's head and its line's last round,
one step into the head and lane indexes of migration 0009. After ANALYZE saw no waiting job (a
queue that drained, its jobs deleted: no row per page), PostgreSQL expects none, and planned
both lookups as a read of every waiting job through another partial index of waiting jobs and a
sort: every defer, single or bulk, read the whole backlog, quadratic in a burst (`bench`: a
single defer took 1.5 ms at the start of a burst and 6.4 ms at 14,000 jobs waiting, until
autovacuum analyzed the table). Planned with sorts off, the only plan left is the index that
gives the order (tests/jobs/test_fairness.py). The lookups are the same as before; a PL/pgSQL
function keeps their plans for the session, as the inline subqueries' were.
"""

from django.db import migrations

FORWARD = """
CREATE FUNCTION jobs_fair_first_round(queue varchar, owner bigint, job_priority integer, defers_per_round bigint)
RETURNS bigint LANGUAGE plpgsql STABLE SET enable_sort = off AS $$
BEGIN
    RETURN GREATEST(
        (SELECT last_value FROM procrastinate_jobs_id_seq) / defers_per_round,
        (SELECT head.fair_round FROM procrastinate_jobs AS head
          WHERE head.status = 'todo' AND head.fair_round IS NOT NULL AND head.scheduled_at IS NULL
            AND head.queue_name = queue
          ORDER BY head.fair_round LIMIT 1),
        (SELECT lane.fair_round FROM procrastinate_jobs AS lane
          WHERE lane.status = 'todo' AND lane.fair_round IS NOT NULL
            AND lane.queue_name = queue AND COALESCE(lane.owner_id, 0) = COALESCE(owner, 0)
            AND lane.priority = job_priority
          ORDER BY lane.fair_round DESC LIMIT 1) + 1
    );
END
$$;
"""

BACKWARD = "DROP FUNCTION jobs_fair_first_round(varchar, bigint, integer, bigint);"


class Migration(migrations.Migration):
    dependencies = [("jobs", "0017_concurrency_wake_when_full")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
