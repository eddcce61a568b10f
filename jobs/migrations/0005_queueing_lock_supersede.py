"""Putting a job back in its queue when a newer job of its queueing lock already waits there.

Only one job of a queueing lock may be `todo` (procrastinate_jobs_queueing_lock_idx_v1), but one
may be `doing` while another waits: a note edited while its enrichment runs has a second
enrichment queued. When the running one then needs a retry (Claude answered 529), Procrastinate's
`procrastinate_retry_job_v2` fails on the unique index, the worker cannot write the job's end and
the job stays `doing` for good, holding its `lock`, so the waiting one never runs either
(Procrastinate issues 1446 and 1543).

The rule here: the job that waits stands for the same work and reads the latest rows when it
runs (that is what a queueing lock means), so it supersedes the one going back. That one ends
`cancelled`, with "Superseded by job N ..." as its last error (`jobs_job_info.error`) and a
`cancelled` event, instead of going back to `todo`. The automatic paths use it: a worker's
retry decision and the stalled-job rescue (`jobs_retry_job_v1`), and the re-queueing of jobs a
worker lost track of in an outage (`jobs_requeue_orphans_v1`, one job at a time, so one
conflict never stops the others). An operator's retry refuses instead (jobs/services.py).
"""

from django.db import migrations

FORWARD = """
-- `job_id`, about to go back to `todo`, is superseded by the job of its queueing lock waiting
-- there. Returns that job's id, or NULL when none waits (any more): then the caller tries again.
CREATE FUNCTION jobs_supersede_v1(job_id bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    _queueing_lock text;
    _waiting_id bigint;
BEGIN
    SELECT queueing_lock INTO _queueing_lock FROM procrastinate_jobs WHERE id = job_id;
    SELECT id INTO _waiting_id FROM procrastinate_jobs
     WHERE queueing_lock = _queueing_lock AND status = 'todo' AND id <> job_id;
    IF _waiting_id IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE procrastinate_jobs
       SET status = 'cancelled',
           abort_requested = false,
           attempts = CASE status WHEN 'doing' THEN attempts + 1 ELSE attempts END
     WHERE id = job_id;
    -- The status trigger records no event for doing -> cancelled: the timeline says it here.
    INSERT INTO procrastinate_events (job_id, type) VALUES (job_id, 'cancelled');
    INSERT INTO jobs_job_info (job_id, error)
    VALUES (job_id, format(
        'Superseded by job %s, already waiting with the same queueing lock (%s): it does this work.',
        _waiting_id, _queueing_lock))
    ON CONFLICT ON CONSTRAINT jobs_job_info_pkey DO UPDATE SET error = EXCLUDED.error;
    RETURN _waiting_id;
END;
$$;

-- True for a violation of the queueing-lock index (whatever its version suffix).
CREATE FUNCTION jobs_is_queueing_lock_conflict(constraint_name text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT constraint_name LIKE 'procrastinate_jobs_queueing_lock_idx%'
$$;

-- procrastinate_retry_job_v2, except that a job waiting with the same queueing lock supersedes
-- the retried one. Returns the id of that job, or NULL when the job was retried (or failed on
-- an abort request, as in Procrastinate).
CREATE FUNCTION jobs_retry_job_v1(
    job_id bigint,
    retry_at timestamp with time zone,
    new_priority integer,
    new_queue_name character varying,
    new_lock character varying
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    _constraint text;
    _waiting_id bigint;
BEGIN
    -- A few rounds: the waiting job may start between the conflict and the look-up, and then
    -- the retry goes through.
    FOR _round IN 1..5 LOOP
        BEGIN
            PERFORM procrastinate_retry_job_v2(job_id, retry_at, new_priority, new_queue_name, new_lock);
            RETURN NULL;
        EXCEPTION WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS _constraint = CONSTRAINT_NAME;
            IF NOT jobs_is_queueing_lock_conflict(_constraint) THEN
                RAISE;
            END IF;
        END;
        _waiting_id := jobs_supersede_v1(job_id);
        IF _waiting_id IS NOT NULL THEN
            RETURN _waiting_id;
        END IF;
    END LOOP;
    RAISE 'Could not retry job % nor find the job waiting with its queueing lock', job_id;
END;
$$;

-- The worker's re-queueing after an outage (jobs/manager.py), one job at a time, newest first:
-- of two lost jobs with one queueing lock, the newer goes back and supersedes the older.
CREATE FUNCTION jobs_requeue_orphans_v1(worker bigint, keep bigint[])
RETURNS TABLE (job_id bigint, superseded_by bigint) LANGUAGE plpgsql AS $$
DECLARE
    _id bigint;
    _constraint text;
BEGIN
    FOR _id IN
        SELECT id FROM procrastinate_jobs
         WHERE worker_id = worker AND status = 'doing' AND NOT (id = ANY(keep))
         ORDER BY id DESC
           FOR UPDATE
    LOOP
        job_id := _id;
        superseded_by := NULL;
        FOR _round IN 1..5 LOOP
            BEGIN
                UPDATE procrastinate_jobs SET status = 'todo', worker_id = NULL WHERE id = _id;
                EXIT;
            EXCEPTION WHEN unique_violation THEN
                GET STACKED DIAGNOSTICS _constraint = CONSTRAINT_NAME;
                IF NOT jobs_is_queueing_lock_conflict(_constraint) THEN
                    RAISE;
                END IF;
            END;
            superseded_by := jobs_supersede_v1(_id);
            EXIT WHEN superseded_by IS NOT NULL;
        END LOOP;
        RETURN NEXT;
    END LOOP;
END;
$$;
"""

BACKWARD = """
DROP FUNCTION jobs_requeue_orphans_v1(bigint, bigint[]);
DROP FUNCTION jobs_retry_job_v1(bigint, timestamp with time zone, integer, character varying, character varying);
DROP FUNCTION jobs_is_queueing_lock_conflict(text);
DROP FUNCTION jobs_supersede_v1(bigint);
"""


class Migration(migrations.Migration):
    dependencies = [("jobs", "0004_claim_planning_and_autovacuum")]

    operations = [migrations.RunSQL(sql=FORWARD, reverse_sql=BACKWARD)]
