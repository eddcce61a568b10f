"""Batch streams (GET /api/jobs/batches/{id}/stream/): a batch's new counts are NOTIFYed, only
while a client streams it.

- `jobs_batch_watches`: the batches some web process streams (jobs/console/stream_hub.py adds
  and removes the rows). A table of its own rather than a `watched` column: the batch row is
  locked by each statement that counts its members, and by an import's whole batch of rows
  (`members_add`), and the stream hub's one connection must not wait behind them. No foreign
  key either: its KEY SHARE lock would wait for those same row locks. A row outlives its batch
  only if a web process died while streaming it; it holds nothing but the id.
- `jobs_batches_notify(ids)`: one NOTIFY on `secondbrain_batch_<id>` per watched batch of `ids`,
  with its state and counts (and its callbacks' job ids, once done: the last 20, so that a batch
  completed again and again never reaches NOTIFY's 8000-byte limit, which would fail the
  statement ending its members). With no batch watched it is one probe of an empty index.
- `jobs_batches_complete(ids)` (migration 0008) calls it last. The status trigger
  `jobs_workflow_after_jobs_updated` calls that function once per statement with the batches
  whose counts the statement changed, and `job_batch_seal` with the batch it seals: so each
  statement that ends members NOTIFYs once per watched batch, after the completion (the final
  state, with the callback job ids), and only statements touching batch members pay for it.
  `members_add` calls it for a batch that grows while open.
"""

from django.db import migrations

_COMPLETE_HEAD = """
CREATE OR REPLACE FUNCTION jobs_batches_complete(ids bigint[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    batch jobs_batches;
    callback text;
    spec jsonb;
    job_id bigint;
    deferred bigint[];
BEGIN
    FOR batch IN
        UPDATE jobs_batches
           SET state = 'done', completed_at = now(), completions = completions + 1
         WHERE id = ANY(ids) AND state = 'sealed' AND succeeded + failed + cancelled >= total
        RETURNING *
    LOOP
        deferred := '{}';
        FOREACH callback IN ARRAY ARRAY[
            CASE WHEN batch.failed + batch.cancelled = 0 THEN 'on_success' ELSE 'on_failure' END, 'on_complete'
        ] LOOP
            spec := batch.callbacks -> callback;
            CONTINUE WHEN spec IS NULL;
            INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, args)
            VALUES (spec ->> 'queue', spec ->> 'task', coalesce((spec ->> 'priority')::integer, 0), spec ->> 'lock',
                    coalesce(spec -> 'kwargs', '{}'::jsonb) || jsonb_build_object(
                        'batch_id', batch.id, 'total', batch.total, 'succeeded', batch.succeeded,
                        'failed', batch.failed, 'cancelled', batch.cancelled))
            RETURNING id INTO job_id;
            IF batch.owner_id IS NOT NULL THEN
                INSERT INTO jobs_job_info (job_id, owner_id, callback_url)
                VALUES (job_id, batch.owner_id, batch.callback_url);
            END IF;
            deferred := deferred || job_id;
        END LOOP;
        UPDATE jobs_batches SET callback_job_ids = callback_job_ids || to_jsonb(deferred) WHERE id = batch.id;
    END LOOP;
"""

FORWARD = (
    """
CREATE TABLE jobs_batch_watches (batch_id bigint PRIMARY KEY);

CREATE FUNCTION jobs_batches_notify(ids bigint[]) RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('secondbrain_batch_' || b.id, json_build_object(
               'type', 'batch', 'state', b.state, 'total', b.total, 'succeeded', b.succeeded,
               'failed', b.failed, 'cancelled', b.cancelled, 'callback_job_ids',
               CASE WHEN jsonb_array_length(b.callback_job_ids) <= 20 THEN b.callback_job_ids
                    ELSE (SELECT jsonb_agg(e ORDER BY n)
                            FROM jsonb_array_elements(b.callback_job_ids) WITH ORDINALITY AS t (e, n)
                           WHERE n > jsonb_array_length(b.callback_job_ids) - 20)
               END)::text)
      FROM jobs_batch_watches AS w JOIN jobs_batches AS b ON b.id = w.batch_id
     WHERE w.batch_id = ANY(ids);
$$;
"""
    + _COMPLETE_HEAD
    + """
    PERFORM jobs_batches_notify(ids);
END;
$$;
"""
)

BACKWARD = (
    _COMPLETE_HEAD
    + """
END;
$$;
DROP FUNCTION jobs_batches_notify(bigint[]);
DROP TABLE jobs_batch_watches;
"""
)


class Migration(migrations.Migration):
    dependencies = [("jobs", "0009_fair_claims")]

    operations = [migrations.RunSQL(sql=FORWARD, reverse_sql=BACKWARD)]
