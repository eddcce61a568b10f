"""The API throttles' buckets (core/throttling.py): one row per client, its time when next empty.

UNLOGGED, as the cache table: counters need no crash safety, and skipping the WAL makes each
request's write cheaper (after a crash PostgreSQL empties the table and limits restart full; a
standby does not have it either). The throttles' old history rows in `core_cache` expire with
their period and go with the periodic purge.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("core", "0003_quota_counters"),
    ]

    operations = [
        migrations.CreateModel(
            name="ThrottleBucket",
            fields=[
                ("key", models.CharField(max_length=255, primary_key=True, serialize=False)),
                (
                    "tat",
                    models.DateTimeField(help_text="The theoretical arrival time of the next request (GCRA)."),
                ),
            ],
            options={
                "db_table": "core_throttle_buckets",
            },
        ),
        migrations.RunSQL(
            sql="ALTER TABLE core_throttle_buckets SET UNLOGGED",
            reverse_sql="ALTER TABLE core_throttle_buckets SET LOGGED",
        ),
    ]
