"""Concurrency limits per key: at most N jobs of a key `doing` at once, across every worker
(`job_task(concurrency=N, concurrency_key=...)`, jobs/tasking/registry.py).

Two columns on procrastinate_jobs, set by the defer (jobs/tasking/defer.py), because the claim
reads them on its hot path:

- `jobs_concurrency_key` (text, nullable, no default: adding it is instant): the job's key,
  e.g. `llm:user:42`, or `task:<name>` for a limit on the whole task. NULL: not limited.
- `jobs_concurrency_limit` (integer, nullable): N, the task's limit when the job was deferred.

`jobs_concurrency_slots` counts, per key, the jobs `doing` now (`running`). Only triggers on
procrastinate_jobs change it (statement-level, reading the transition tables): every row
entering `doing` adds one, every row leaving it (an end, a retry, a rescue, an abort, an
operator's UPDATE) or deleted while `doing` (a finish may delete) takes one away. So the count
follows every path out of `doing`, not only the worker's. A statement whose rows have no key
returns at once (one scan of its transition tables: a claim or a batch of ends, tens of rows).

The claim (jobs/engine/manager.py) skips the jobs of the keys whose slot is full (read once per
claim, a snapshot: one hash probe per waiting job it walks past, so 20,000 waiting jobs of a
full key cost it milliseconds, not an index probe each), then locks the slot rows of the keys it found (an upsert, in key order: it creates the
row of a new key, and waits for a concurrent claim of the same key to commit, then reads its
latest count), and takes at most `limit - running` of that key's candidates. The trigger adds
them in the same transaction, before the slot's lock is released: two claims racing on the last
slot never both take it. Slot rows are created by the claim, not at defer, so deferring costs
nothing more; `jobs_concurrency_reconcile()` (run with the stalled-job rescue) deletes rows of
keys with nothing running and recomputes the count from the `doing` rows after a drift
(a TRUNCATE, triggers disabled by `session_replication_role = replica`).

When a slot frees and a job of its key waits, the queue of one such job hears of it (the NOTIFY
of a new job): a worker idle because the key was full claims it at once.

`jobs_concurrency_waiting_idx` holds only keyed jobs waiting or running: the dashboard's counts,
the wake-up's "does a job of this key wait" and the reconciliation's count read it.
"""

from django.db import migrations

FORWARD = """
ALTER TABLE procrastinate_jobs ADD COLUMN jobs_concurrency_key text, ADD COLUMN jobs_concurrency_limit integer;
CREATE INDEX jobs_concurrency_waiting_idx ON procrastinate_jobs (jobs_concurrency_key, status)
    WHERE jobs_concurrency_key IS NOT NULL AND status IN ('todo', 'doing');

-- Rewritten at every claim of a key and every end: room on the page for HOT updates.
CREATE TABLE jobs_concurrency_slots (
    key text PRIMARY KEY,
    running integer NOT NULL DEFAULT 0,
    -- The limit its last claim read from its jobs: `running >= concurrency_limit` is "full"
    -- for the claim's first pass (NULL until a claim sets it: not known full).
    concurrency_limit integer
) WITH (fillfactor = 50);

-- Add `deltas` to the running counts of `keys` (locked in key order: two statements never
-- deadlock on them). Where a slot frees and a job of its key waits, that job's queue hears of it.
CREATE FUNCTION jobs_concurrency_slots_add(keys text[], deltas integer[]) RETURNS void LANGUAGE plpgsql AS $$
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

CREATE FUNCTION jobs_concurrency_after_jobs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    keys text[];
    deltas integer[];
BEGIN
    -- Nearly every statement (claims and ends of plain jobs) stops here.
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE jobs_concurrency_key IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM old_rows WHERE jobs_concurrency_key IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    -- A row that stays `doing` under the same key counts -1 + 1: no change.
    SELECT array_agg(key ORDER BY key), array_agg(delta ORDER BY key) INTO keys, deltas
      FROM (SELECT key, sum(delta)::integer AS delta
              FROM (SELECT jobs_concurrency_key AS key, -1 AS delta FROM old_rows
                     WHERE status = 'doing' AND jobs_concurrency_key IS NOT NULL
                    UNION ALL
                    SELECT jobs_concurrency_key, 1 FROM new_rows
                     WHERE status = 'doing' AND jobs_concurrency_key IS NOT NULL) AS changes
             GROUP BY key) AS totals
     WHERE delta <> 0;
    IF keys IS NOT NULL THEN
        PERFORM jobs_concurrency_slots_add(keys, deltas);
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION jobs_concurrency_after_jobs_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    keys text[];
    deltas integer[];
BEGIN
    SELECT array_agg(key ORDER BY key), array_agg(delta ORDER BY key) INTO keys, deltas
      FROM (SELECT jobs_concurrency_key AS key, -count(*)::integer AS delta FROM old_rows
             WHERE status = 'doing' AND jobs_concurrency_key IS NOT NULL
             GROUP BY jobs_concurrency_key) AS totals;
    IF keys IS NOT NULL THEN
        PERFORM jobs_concurrency_slots_add(keys, deltas);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_concurrency_after_jobs_updated
    AFTER UPDATE ON procrastinate_jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_concurrency_after_jobs_updated();
CREATE TRIGGER jobs_concurrency_after_jobs_deleted
    AFTER DELETE ON procrastinate_jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_concurrency_after_jobs_deleted();

-- Recompute each key's count from its `doing` rows; delete the rows of keys with nothing
-- running (a claim creates them again). Returns the keys whose count was wrong.
-- Each key is locked before its jobs are counted, by a statement of its own (a fresh snapshot
-- under READ COMMITTED): a claim of that key cannot be in flight then (it holds that lock until
-- it commits), and an end not yet committed is still `doing` here and takes its one away after.
CREATE FUNCTION jobs_concurrency_reconcile() RETURNS TABLE (key text, counted integer, actual integer)
LANGUAGE plpgsql AS $$
DECLARE
    slot_key text;
    was integer;
    doing integer;
BEGIN
    INSERT INTO jobs_concurrency_slots AS slot (key)
    SELECT DISTINCT jobs_concurrency_key FROM procrastinate_jobs
     WHERE jobs_concurrency_key IS NOT NULL AND status = 'doing'
     ORDER BY 1
    ON CONFLICT ON CONSTRAINT jobs_concurrency_slots_pkey DO NOTHING;
    FOR slot_key IN SELECT slot.key FROM jobs_concurrency_slots AS slot ORDER BY slot.key LOOP
        SELECT slot.running INTO was FROM jobs_concurrency_slots AS slot WHERE slot.key = slot_key FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        SELECT count(*) INTO doing FROM procrastinate_jobs
         WHERE jobs_concurrency_key = slot_key AND status = 'doing';
        IF doing = 0 THEN
            DELETE FROM jobs_concurrency_slots AS slot WHERE slot.key = slot_key;
        ELSIF doing <> was THEN
            UPDATE jobs_concurrency_slots AS slot SET running = doing WHERE slot.key = slot_key;
        END IF;
        IF doing <> was THEN
            key := slot_key;
            counted := was;
            actual := doing;
            RETURN NEXT;
        END IF;
    END LOOP;
END;
$$;
"""

BACKWARD = """
DROP FUNCTION jobs_concurrency_reconcile();
DROP TRIGGER jobs_concurrency_after_jobs_deleted ON procrastinate_jobs;
DROP TRIGGER jobs_concurrency_after_jobs_updated ON procrastinate_jobs;
DROP FUNCTION jobs_concurrency_after_jobs_deleted();
DROP FUNCTION jobs_concurrency_after_jobs_updated();
DROP FUNCTION jobs_concurrency_slots_add(text[], integer[]);
DROP TABLE jobs_concurrency_slots;
DROP INDEX jobs_concurrency_waiting_idx;
ALTER TABLE procrastinate_jobs DROP COLUMN jobs_concurrency_limit, DROP COLUMN jobs_concurrency_key;
"""


class Migration(migrations.Migration):
    dependencies = [("jobs", "0011_job_snoozes")]

    operations = [migrations.RunSQL(sql=FORWARD, reverse_sql=BACKWARD)]
