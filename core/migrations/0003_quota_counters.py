"""Daily quota counters (core/quotas.py): e-mails and LLM dollars per user and UTC day."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("core", "0001_idempotency_keys_and_cache"),
    ]

    operations = [
        migrations.CreateModel(
            name="QuotaCounter",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("key", models.CharField(max_length=200)),
                ("day", models.DateField()),
                ("used", models.DecimalField(decimal_places=6, default=0, max_digits=20)),
            ],
            options={
                "db_table": "core_quota_counters",
                "constraints": [models.UniqueConstraint(fields=("key", "day"), name="core_quota_counter_key_day")],
            },
        ),
    ]
