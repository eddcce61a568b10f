"""Ledger rows of calls that timed out after they were sent: their cost is an estimate."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("llm", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="llmusage",
            name="estimated",
            field=models.BooleanField(db_default=False, default=False),
        ),
    ]
