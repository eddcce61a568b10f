"""Completion webhooks get their own queue and each user a signing secret.

- The status trigger (migration 0003) defers `jobs.webhook_deliver` on `webhooks` instead of
  `maintenance`: a slow receiver no longer delays the stalled-job rescue and the purge.
  Deliveries still waiting move with it.
- `jobs_webhook_secrets`: one HMAC key per user, so one receiver cannot forge another's
  deliveries.
"""

from django.conf import settings
from django.db import migrations, models

FORWARD = """
CREATE OR REPLACE FUNCTION jobs_after_jobs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
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
                'webhooks', 'jobs.webhook_deliver', 0, NULL, NULL,
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
UPDATE procrastinate_jobs SET queue_name = 'webhooks'
 WHERE task_name = 'jobs.webhook_deliver' AND status = 'todo' AND queue_name = 'maintenance';
"""

BACKWARD = """
CREATE OR REPLACE FUNCTION jobs_after_jobs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
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
UPDATE procrastinate_jobs SET queue_name = 'maintenance'
 WHERE task_name = 'jobs.webhook_deliver' AND status = 'todo' AND queue_name = 'webhooks';
"""


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0005_queueing_lock_supersede"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="WebhookSecret",
            fields=[
                (
                    "user",
                    models.OneToOneField(
                        on_delete=models.deletion.CASCADE,
                        primary_key=True,
                        related_name="webhook_secret",
                        serialize=False,
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                ("secret", models.CharField(max_length=100)),
                ("created_at", models.DateTimeField()),
            ],
            options={"db_table": "jobs_webhook_secrets"},
        ),
        migrations.RunSQL(sql=FORWARD, reverse_sql=BACKWARD),
    ]
