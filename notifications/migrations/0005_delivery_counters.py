"""Delivery logs by outcome as counters kept by a trigger, so /metrics reads a few rows and
retention purges don't lower them (issue 11, item 6). CREATE TRIGGER locks the log table
against writes until this migration commits, so the backfill counts exactly the rows the
trigger did not see."""

from django.db import migrations, models

# One upsert per INSERT statement (a transition table, not a per-row trigger). The shard is the
# writer's backend: concurrent senders update different rows. ORDER BY takes the row locks in
# one order, so two writers of one shard cannot deadlock.
_CREATE = """
CREATE FUNCTION notification_delivery_logs_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notification_delivery_counters AS c (outcome, shard, count)
    SELECT outcome, pg_backend_pid() % 8, count(*) FROM new_rows GROUP BY outcome ORDER BY outcome
    ON CONFLICT (outcome, shard) DO UPDATE SET count = c.count + EXCLUDED.count;
    RETURN NULL;
END
$$;
CREATE TRIGGER notification_delivery_logs_count
    AFTER INSERT ON notification_delivery_logs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notification_delivery_logs_count();
INSERT INTO notification_delivery_counters (outcome, shard, count)
SELECT outcome, 0, count(*) FROM notification_delivery_logs GROUP BY outcome;
"""
_DROP = """
DROP TRIGGER notification_delivery_logs_count ON notification_delivery_logs;
DROP FUNCTION notification_delivery_logs_count();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("notifications", "0002_delivery_log_created_idx"),
    ]

    operations = [
        migrations.CreateModel(
            name="DeliveryCounter",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("outcome", models.CharField(max_length=20)),
                ("shard", models.SmallIntegerField()),
                ("count", models.BigIntegerField(default=0)),
            ],
            options={
                "db_table": "notification_delivery_counters",
                "constraints": [
                    models.UniqueConstraint(fields=("outcome", "shard"), name="notif_delivery_counter_key")
                ],
            },
        ),
        migrations.RunSQL(_CREATE, _DROP),
    ]
