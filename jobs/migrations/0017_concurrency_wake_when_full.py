"""A freed concurrency slot wakes the other workers only when its key had every slot taken.

`jobs_concurrency_slots_add` (migration 0012) looked, for every key an end freed a slot of, for a
waiting job of that key (twice: its queue, then whether any waits at all) and NOTIFYed. A claim
takes a key's jobs while it has a free slot, so a job of the key waits for a slot only when all
of them were taken: below the limit nothing waits for this end, and the lookups bought nothing.
In `make bench ARGS="--only features"` (ten keys, limit 1,000, never reached) they were most of
the 360 µs of PostgreSQL time per job of the batch of completions. The upsert now returns each
key's new count and its limit, and only the keys that were full before this change (or whose
limit no claim has recorded yet) are looked up and woken.
"""

from django.db import migrations

FORWARD = """
CREATE OR REPLACE FUNCTION jobs_concurrency_slots_add(keys text[], deltas integer[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    freed_full text[];
BEGIN
    WITH changed AS (
        INSERT INTO jobs_concurrency_slots AS slot (key, running)
        SELECT d.key, d.delta FROM unnest(keys, deltas) AS d (key, delta) ORDER BY d.key
        ON CONFLICT (key) DO UPDATE SET running = GREATEST(slot.running + EXCLUDED.running, 0)
        RETURNING slot.key, slot.running, slot.concurrency_limit
    )
    SELECT array_agg(changed.key) INTO freed_full
      FROM changed JOIN unnest(keys, deltas) AS d (key, delta) ON d.key = changed.key
     WHERE d.delta < 0
       AND (changed.concurrency_limit IS NULL OR changed.running - d.delta >= changed.concurrency_limit);
    IF freed_full IS NULL THEN
        RETURN;
    END IF;

    PERFORM pg_notify(channel, '{"type": "job_inserted"}')
       FROM (SELECT DISTINCT 'procrastinate_queue_v1#' || waiting.queue_name AS channel
               FROM unnest(freed_full) AS d (key)
               CROSS JOIN LATERAL (
                   SELECT queue_name FROM procrastinate_jobs
                    WHERE jobs_concurrency_key = d.key AND status = 'todo' LIMIT 1
               ) AS waiting
             UNION ALL
             SELECT 'procrastinate_any_queue_v1'
              WHERE EXISTS (SELECT 1 FROM unnest(freed_full) AS d (key)
                             WHERE EXISTS (SELECT 1 FROM procrastinate_jobs
                                            WHERE jobs_concurrency_key = d.key AND status = 'todo'))) AS channels;
END;
$$;
"""

# Migration 0012's function, as it was.
BACKWARD = """
CREATE OR REPLACE FUNCTION jobs_concurrency_slots_add(keys text[], deltas integer[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO jobs_concurrency_slots AS slot (key, running)
    SELECT d.key, d.delta FROM unnest(keys, deltas) AS d (key, delta) ORDER BY d.key
    ON CONFLICT (key) DO UPDATE SET running = GREATEST(slot.running + EXCLUDED.running, 0);

    PERFORM pg_notify(channel, '{"type": "job_inserted"}')
       FROM (SELECT DISTINCT 'procrastinate_queue_v1#' || waiting.queue_name AS channel
               FROM unnest(keys, deltas) AS d (key, delta)
               CROSS JOIN LATERAL (
                   SELECT queue_name FROM procrastinate_jobs
                    WHERE jobs_concurrency_key = d.key AND status = 'todo' LIMIT 1
               ) AS waiting
              WHERE d.delta < 0
             UNION ALL
             SELECT 'procrastinate_any_queue_v1'
              WHERE EXISTS (SELECT 1 FROM unnest(keys, deltas) AS d (key, delta)
                             WHERE d.delta < 0 AND EXISTS (
                                 SELECT 1 FROM procrastinate_jobs
                                  WHERE jobs_concurrency_key = d.key AND status = 'todo'))) AS channels;
END;
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("jobs", "0016_job_info_trigger_lookups")]

    operations = [migrations.RunSQL(sql=FORWARD, reverse_sql=BACKWARD)]
