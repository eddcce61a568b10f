"""An import may e-mail its owner once its enrichment has ended (`notify_email`); the
notification that does it (`email_notification_id`). Both columns are added without a table
rewrite (a constant default, a nullable column)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("notes", "0004_import_file_retention"),
    ]

    operations = [
        migrations.AddField(
            model_name="noteimport",
            name="email_notification_id",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="noteimport",
            name="notify_email",
            field=models.BooleanField(db_default=False, default=False),
        ),
    ]
