"""Import files are deleted after their retention: when, and an index of the files still kept."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("notes", "0003_owner_id_index"),
    ]

    operations = [
        migrations.AddField(
            model_name="noteimport",
            name="file_deleted_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="noteimport",
            index=models.Index(
                condition=models.Q(file_deleted_at__isnull=True), fields=["finished_at"], name="notes_import_file_kept"
            ),
        ),
    ]
