"""Statement-level triggers on procrastinate_jobs instead of row-level ones.

Procrastinate fires three plpgsql functions per row: a NOTIFY on two channels for each inserted
job (so a bulk insert of 1,000 jobs queues 2,000 notifications, and every enqueueing
transaction takes the global NOTIFY lock at commit), an events row for each insert, and one for
each status change. Here each is one statement per statement, reading the transition tables:
one NOTIFY per queue touched (its listeners only need to know "there is work"), one INSERT of
all the event rows. Our own status-change trigger (stream NOTIFY and webhooks, migration 0002)
becomes statement-level the same way. Same rows, same channels, far fewer calls.
"""

from django.db import migrations

FORWARD = """
DROP TRIGGER procrastinate_jobs_notify_queue_job_inserted_v1 ON procrastinate_jobs;
DROP TRIGGER procrastinate_trigger_status_events_insert_v1 ON procrastinate_jobs;
DROP TRIGGER procrastinate_trigger_status_events_update_v1 ON procrastinate_jobs;
DROP TRIGGER jobs_on_job_status_change ON procrastinate_jobs;
DROP FUNCTION jobs_on_job_status_change();

CREATE FUNCTION jobs_after_jobs_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    queue varchar;
BEGIN
    INSERT INTO procrastinate_events (job_id, type)
        SELECT id, 'deferred'::procrastinate_job_event_type FROM inserted WHERE status = 'todo';
    FOR queue IN SELECT DISTINCT queue_name FROM inserted WHERE status = 'todo' LOOP
        PERFORM pg_notify('procrastinate_queue_v1#' || queue, '{"type": "job_inserted"}');
    END LOOP;
    IF FOUND THEN
        PERFORM pg_notify('procrastinate_any_queue_v1', '{"type": "job_inserted"}');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_after_jobs_inserted
    AFTER INSERT ON procrastinate_jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_after_jobs_inserted();

-- Procrastinate's status events (procrastinate_trigger_function_status_events_update_v1) for
-- every changed row at once; then, for jobs with an info row, the stream NOTIFY when a client
-- watches the job and the completion webhook when it has ended with a callback URL.
CREATE FUNCTION jobs_after_jobs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO procrastinate_events (job_id, type)
    SELECT changed.id, changed.event_type
      FROM (
        SELECT n.id,
               CASE
                   WHEN o.status = 'todo' AND n.status = 'doing' THEN 'started'
                   WHEN o.status = 'doing' AND n.status = 'todo' THEN 'deferred_for_retry'
                   WHEN o.status = 'doing' AND n.status = 'failed' THEN 'failed'
                   WHEN o.status = 'doing' AND n.status = 'succeeded' THEN 'succeeded'
                   WHEN o.status = 'todo' AND n.status IN ('cancelled', 'failed', 'succeeded') THEN 'cancelled'
                   WHEN o.status = 'doing' AND n.status = 'aborted' THEN 'aborted'
                   WHEN o.status = 'failed' AND n.status = 'todo' THEN 'retried'
               END::procrastinate_job_event_type AS event_type
          FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
         WHERE o.status IS DISTINCT FROM n.status
         ORDER BY n.id
      ) AS changed
     WHERE changed.event_type IS NOT NULL;

    PERFORM pg_notify('secondbrain_job_' || n.id, json_build_object('type', 'status', 'status', n.status)::text)
       FROM new_rows AS n
       JOIN old_rows AS o ON o.id = n.id
       JOIN jobs_job_info AS info ON info.job_id = n.id
      WHERE o.status IS DISTINCT FROM n.status AND info.watched;

    PERFORM procrastinate_defer_jobs_v1(array_agg(ROW(
                'maintenance', 'jobs.webhook_deliver', 0, NULL, NULL,
                json_build_object('job_id', n.id, 'status', n.status)::jsonb, NULL
            )::procrastinate_job_to_defer_v1 ORDER BY n.id))
       FROM new_rows AS n
       JOIN old_rows AS o ON o.id = n.id
       JOIN jobs_job_info AS info ON info.job_id = n.id
      WHERE o.status IS DISTINCT FROM n.status
        AND n.status IN ('succeeded', 'failed', 'cancelled', 'aborted')
        AND info.callback_url <> ''
     HAVING count(*) > 0;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_after_jobs_updated
    AFTER UPDATE ON procrastinate_jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_after_jobs_updated();
"""

BACKWARD = """
DROP TRIGGER jobs_after_jobs_updated ON procrastinate_jobs;
DROP FUNCTION jobs_after_jobs_updated();
DROP TRIGGER jobs_after_jobs_inserted ON procrastinate_jobs;
DROP FUNCTION jobs_after_jobs_inserted();

CREATE TRIGGER procrastinate_jobs_notify_queue_job_inserted_v1
    AFTER INSERT ON procrastinate_jobs
    FOR EACH ROW WHEN ((new.status = 'todo'::procrastinate_job_status))
    EXECUTE PROCEDURE procrastinate_notify_queue_job_inserted_v1();
CREATE TRIGGER procrastinate_trigger_status_events_insert_v1
    AFTER INSERT ON procrastinate_jobs
    FOR EACH ROW WHEN ((new.status = 'todo'::procrastinate_job_status))
    EXECUTE PROCEDURE procrastinate_trigger_function_status_events_insert_v1();
CREATE TRIGGER procrastinate_trigger_status_events_update_v1
    AFTER UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW
    EXECUTE PROCEDURE procrastinate_trigger_function_status_events_update_v1();

CREATE FUNCTION jobs_on_job_status_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    info jobs_job_info;
BEGIN
    SELECT * INTO info FROM jobs_job_info WHERE job_id = NEW.id;
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;
    IF info.watched THEN
        PERFORM pg_notify('secondbrain_job_' || NEW.id, json_build_object('type', 'status', 'status', NEW.status)::text);
    END IF;
    IF info.callback_url <> '' AND NEW.status IN ('succeeded', 'failed', 'cancelled', 'aborted') THEN
        PERFORM procrastinate_defer_jobs_v1(ARRAY[ROW(
            'maintenance', 'jobs.webhook_deliver', 0, NULL, NULL,
            json_build_object('job_id', NEW.id, 'status', NEW.status)::jsonb, NULL
        )::procrastinate_job_to_defer_v1]);
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER jobs_on_job_status_change
    AFTER UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION jobs_on_job_status_change();
"""


class Migration(migrations.Migration):
    dependencies = [("jobs", "0002_job_info_and_paused_queues")]

    operations = [migrations.RunSQL(sql=FORWARD, reverse_sql=BACKWARD)]
