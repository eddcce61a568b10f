"""The retention purge deletes delivery logs by age: an index on created_at."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("notifications", "0001_initial"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="deliverylog",
            index=models.Index(fields=["created_at"], name="notif_log_created_idx"),
        ),
    ]
