"""Job dependencies (a job that waits for others) and batches (a group with a callback).

Three columns on procrastinate_jobs, because the claim and the status trigger read them on the
hot path and a join there would cost every job, not only the jobs of a workflow:

- `jobs_parents_waiting` (integer, default 0, no table rewrite): how many of the job's parents
  have not ended yet. The claim takes only jobs where it is 0 (jobs/engine/manager.py).
- `jobs_has_children` (boolean, default false): the job has dependents. With
  `jobs_batch_id` it lets the trigger below return at once for a statement that touches no job
  of a workflow or a batch, which is nearly every statement.
- `jobs_batch_id` (nullable, no default): the batch the job belongs to.

`jobs_job_dependencies` holds the edges (child, parent) and their state: `waiting`, `succeeded`,
or `failed` (the parent failed for good, was cancelled or aborted). A child's
`jobs_parents_waiting` counts its `waiting` edges; it is only ever changed by adding or
subtracting (never recomputed from the edges), so two parents ending at once in two
transactions both count: the child's row lock serialises them on its latest version.

`jobs_batches` holds a batch's counts, its callbacks and its state: `open` (members may still
be added), `sealed` (no more members: it completes when every member has ended), `done`.

The trigger `jobs_workflow_after_jobs_updated` (statement-level, its own function) does, for
the status changes of one statement:

- a parent that succeeded: its edges leave `waiting`; children reaching 0 are claimable, and
  their queues hear of it (the NOTIFY of a new job), so no worker polls for them.
- a parent that failed for good, was cancelled or aborted: its edges become `failed`; a child
  whose policy is `cancel` (the default) and that still waits is cancelled, with the reason as its
  last error; a child whose policy is `run` runs once its other parents have ended.
- a parent an operator retried (failed/cancelled/aborted -> todo): its edges wait again; a child
  cancelled because of its parents comes back to `todo` (blocked) once none of its parents is
  `failed` any more. So a retried parent un-blocks its children when it succeeds.
  The same rules apply to the children's own children (the trigger fires for its own updates).
- members of a batch that ended (or were retried) change the batch's counts; the statement
  that ends the last member of a sealed batch defers its callbacks, once: the batch row is
  locked by the count update and its state turns `done` in the same transaction.

Cycles cannot happen: a job's parents are given when it is inserted, so they exist before it,
and edges are never added to an existing job.
"""

from django.conf import settings
from django.db import migrations, models

FORWARD = """
ALTER TABLE procrastinate_jobs
    ADD COLUMN jobs_parents_waiting integer NOT NULL DEFAULT 0,
    ADD COLUMN jobs_has_children boolean NOT NULL DEFAULT false,
    ADD COLUMN jobs_batch_id bigint;
CREATE INDEX jobs_procrastinate_jobs_batch ON procrastinate_jobs (jobs_batch_id) WHERE jobs_batch_id IS NOT NULL;

CREATE TABLE jobs_job_dependencies (
    child_id bigint NOT NULL REFERENCES procrastinate_jobs (id) ON DELETE CASCADE,
    parent_id bigint NOT NULL REFERENCES procrastinate_jobs (id) ON DELETE CASCADE,
    on_parent_failure varchar(6) NOT NULL DEFAULT 'cancel' CHECK (on_parent_failure IN ('cancel', 'run')),
    state varchar(9) NOT NULL DEFAULT 'waiting' CHECK (state IN ('waiting', 'succeeded', 'failed')),
    -- This edge's parent is why the child was cancelled (a retried parent brings it back).
    cancelled_child boolean NOT NULL DEFAULT false,
    PRIMARY KEY (child_id, parent_id)
);
CREATE INDEX jobs_job_dependencies_parent ON jobs_job_dependencies (parent_id);

-- Complete the sealed batches of `ids` whose members have all ended: state `done`, and their
-- callbacks deferred with the counts. Call while holding the batches' row locks.
CREATE FUNCTION jobs_batches_complete(ids bigint[]) RETURNS void LANGUAGE plpgsql AS $$
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
END;
$$;

CREATE FUNCTION jobs_workflow_after_jobs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    -- The edges this statement changes (local variables: the trigger fires again, nested, for
    -- its own updates of the children, and each call keeps its own).
    children bigint[];
    parents bigint[];
    changes text[];
    batch_ids bigint[];
    succeeded_deltas bigint[];
    failed_deltas bigint[];
    cancelled_deltas bigint[];
    notified integer;
BEGIN
    -- Nearly every statement (claims, ends of plain jobs) stops here.
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE jobs_has_children OR jobs_batch_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;

    -- Dependencies.
    SELECT array_agg(child_id ORDER BY child_id, parent_id), array_agg(parent_id ORDER BY child_id, parent_id),
           array_agg(change ORDER BY child_id, parent_id)
      INTO children, parents, changes
      FROM (
        SELECT d.child_id, d.parent_id,
               CASE WHEN n.status = 'succeeded' AND d.state = 'waiting' THEN 'succeeded'
                    WHEN n.status IN ('failed', 'cancelled', 'aborted') AND d.state = 'waiting' THEN 'failed'
                    WHEN n.status = 'todo' AND d.state = 'failed' THEN 'reopened'
               END AS change
          FROM new_rows AS n
          JOIN old_rows AS o ON o.id = n.id
          JOIN jobs_job_dependencies AS d ON d.parent_id = n.id
         WHERE n.jobs_has_children AND o.status IS DISTINCT FROM n.status
      ) AS edges
     WHERE change IS NOT NULL;

    IF children IS NOT NULL THEN
        -- Children locked in id order: two statements ending parents of one child never deadlock.
        PERFORM 1 FROM procrastinate_jobs WHERE id = ANY(children) ORDER BY id FOR UPDATE;

        UPDATE jobs_job_dependencies AS d
           SET state = CASE e.change WHEN 'reopened' THEN 'waiting' ELSE e.change END
          FROM unnest(children, parents, changes) AS e (child_id, parent_id, change)
         WHERE d.child_id = e.child_id AND d.parent_id = e.parent_id;

        -- The children's counts, and the queues of those that became claimable hear of them.
        WITH counts AS (
            SELECT child_id, sum(CASE WHEN change = 'reopened' THEN 1 ELSE -1 END) AS delta
              FROM unnest(children, changes) AS e (child_id, change) GROUP BY child_id
        ), changed AS (
            UPDATE procrastinate_jobs AS job
               SET jobs_parents_waiting = job.jobs_parents_waiting + counts.delta
              FROM counts
             WHERE job.id = counts.child_id
            RETURNING job.status, job.queue_name, job.jobs_parents_waiting
        ), queues AS (
            SELECT DISTINCT queue_name FROM changed WHERE status = 'todo' AND jobs_parents_waiting = 0
        )
        SELECT count(*) INTO notified FROM (
            SELECT pg_notify('procrastinate_queue_v1#' || queue_name, '{"type": "job_inserted"}') FROM queues
            UNION ALL
            SELECT pg_notify('procrastinate_any_queue_v1', '{"type": "job_inserted"}')
             WHERE EXISTS (SELECT 1 FROM queues)
        ) AS notifications;

        -- A failed parent cancels its waiting children whose policy says so, with the reason.
        WITH doomed AS (
            SELECT DISTINCT ON (e.child_id) e.child_id, e.parent_id, parent.status
              FROM unnest(children, parents, changes) AS e (child_id, parent_id, change)
              JOIN jobs_job_dependencies AS d ON d.child_id = e.child_id AND d.parent_id = e.parent_id
              JOIN procrastinate_jobs AS child ON child.id = e.child_id
              JOIN procrastinate_jobs AS parent ON parent.id = e.parent_id
             WHERE e.change = 'failed' AND d.on_parent_failure = 'cancel' AND child.status = 'todo'
             ORDER BY e.child_id, e.parent_id
        ), marked AS (
            UPDATE jobs_job_dependencies AS d SET cancelled_child = true
              FROM doomed WHERE d.child_id = doomed.child_id AND d.parent_id = doomed.parent_id
        ), reasons AS (
            INSERT INTO jobs_job_info (job_id, error)
            SELECT child_id, 'Cancelled: its parent job ' || parent_id || ' ended ' || status FROM doomed
            ON CONFLICT (job_id) DO UPDATE SET error = EXCLUDED.error
        )
        UPDATE procrastinate_jobs SET status = 'cancelled'
         WHERE id IN (SELECT child_id FROM doomed) AND status = 'todo';

        -- A retried parent brings back the children cancelled because of their parents, once
        -- none of their parents is failed any more: they wait for it (blocked) again.
        WITH revived AS (
            SELECT DISTINCT e.child_id
              FROM unnest(children, changes) AS e (child_id, change)
              JOIN procrastinate_jobs AS child ON child.id = e.child_id
             WHERE e.change = 'reopened' AND child.status = 'cancelled'
               AND EXISTS (SELECT 1 FROM jobs_job_dependencies AS d WHERE d.child_id = e.child_id AND d.cancelled_child)
               AND NOT EXISTS (SELECT 1 FROM jobs_job_dependencies AS d
                                WHERE d.child_id = e.child_id AND d.state = 'failed' AND d.on_parent_failure = 'cancel')
        ), cleared AS (
            UPDATE jobs_job_dependencies AS d SET cancelled_child = false
              FROM revived WHERE d.child_id = revived.child_id
        ), reasons AS (
            UPDATE jobs_job_info SET error = '' WHERE job_id IN (SELECT child_id FROM revived)
        )
        UPDATE procrastinate_jobs SET status = 'todo', attempts = 0, scheduled_at = NULL
         WHERE id IN (SELECT child_id FROM revived) AND status = 'cancelled';
    END IF;

    -- Batches: this statement's ends (and retries) counted per batch, then completion.
    WITH deltas AS (
        SELECT n.jobs_batch_id AS batch_id,
               sum((n.status = 'succeeded')::int - (o.status = 'succeeded')::int) AS succeeded,
               sum((n.status = 'failed')::int - (o.status = 'failed')::int) AS failed,
               sum((n.status IN ('cancelled', 'aborted'))::int - (o.status IN ('cancelled', 'aborted'))::int)
                   AS cancelled
          FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
         WHERE n.jobs_batch_id IS NOT NULL AND o.status IS DISTINCT FROM n.status
         GROUP BY n.jobs_batch_id
    )
    SELECT array_agg(batch_id ORDER BY batch_id), array_agg(succeeded ORDER BY batch_id),
           array_agg(failed ORDER BY batch_id), array_agg(cancelled ORDER BY batch_id)
      INTO batch_ids, succeeded_deltas, failed_deltas, cancelled_deltas
      FROM deltas WHERE succeeded <> 0 OR failed <> 0 OR cancelled <> 0;
    IF batch_ids IS NOT NULL THEN
        -- Locked in id order; the lock makes the completion below happen in one transaction only.
        PERFORM 1 FROM jobs_batches WHERE id = ANY(batch_ids) ORDER BY id FOR UPDATE;
        -- A member retried after its batch was done reopens the batch: it completes again.
        UPDATE jobs_batches AS b
           SET succeeded = b.succeeded + d.succeeded, failed = b.failed + d.failed,
               cancelled = b.cancelled + d.cancelled,
               state = CASE WHEN b.state = 'done' AND d.succeeded + d.failed + d.cancelled < 0
                            THEN 'sealed' ELSE b.state END
          FROM unnest(batch_ids, succeeded_deltas, failed_deltas, cancelled_deltas)
               AS d (batch_id, succeeded, failed, cancelled)
         WHERE b.id = d.batch_id;
        PERFORM jobs_batches_complete(batch_ids);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_workflow_after_jobs_updated
    AFTER UPDATE ON procrastinate_jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_workflow_after_jobs_updated();
"""

BACKWARD = """
DROP TRIGGER jobs_workflow_after_jobs_updated ON procrastinate_jobs;
DROP FUNCTION jobs_workflow_after_jobs_updated();
DROP FUNCTION jobs_batches_complete(bigint[]);
DROP TABLE jobs_job_dependencies;
DROP INDEX jobs_procrastinate_jobs_batch;
ALTER TABLE procrastinate_jobs
    DROP COLUMN jobs_parents_waiting, DROP COLUMN jobs_has_children, DROP COLUMN jobs_batch_id;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0006_webhooks_queue_and_secrets"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="JobBatch",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("key", models.CharField(blank=True, max_length=200, null=True, unique=True)),
                ("name", models.CharField(blank=True, db_default="", default="", max_length=200)),
                (
                    "owner",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=models.deletion.CASCADE,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                ("state", models.CharField(db_default="open", default="open", max_length=6)),
                ("total", models.BigIntegerField(db_default=0, default=0)),
                ("succeeded", models.BigIntegerField(db_default=0, default=0)),
                ("failed", models.BigIntegerField(db_default=0, default=0)),
                ("cancelled", models.BigIntegerField(db_default=0, default=0)),
                ("callbacks", models.JSONField(blank=True, default=dict)),
                ("callback_url", models.URLField(blank=True, db_default="", default="", max_length=2000)),
                ("callback_job_ids", models.JSONField(blank=True, default=list)),
                ("completions", models.IntegerField(db_default=0, default=0)),
                ("created_at", models.DateTimeField(db_default=models.functions.Now())),
                ("completed_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={"db_table": "jobs_batches", "ordering": ["-id"]},
        ),
        migrations.RunSQL(
            "ALTER TABLE jobs_batches ALTER COLUMN callbacks SET DEFAULT '{}',"
            " ALTER COLUMN callback_job_ids SET DEFAULT '[]'",
            migrations.RunSQL.noop,
        ),
        migrations.RunSQL(sql=FORWARD, reverse_sql=BACKWARD),
    ]
