"""Rename the models so each says what it is: `Digest` is the stored weekly AI digest, and
`DigestSchedule` e-mails new notes to a recipient. Their tables keep their names (db_table), so
no data moves; Django renames their content types, and the admin permissions follow here."""

from django.db import migrations

# old model name -> (new model name, new verbose name)
RENAMES = {
    "digest": ("weeklydigest", "weekly digest"),
    "digestschedule": ("recipientdigestschedule", "recipient digest schedule"),
}
OLD_VERBOSE = {"digest": "digest", "digestschedule": "digest schedule"}


def _rename_permissions(apps, schema_editor, *, backwards: bool = False) -> None:
    Permission = apps.get_model("auth", "Permission")
    permissions = Permission.objects.filter(content_type__app_label="digests")
    for old, (new, new_verbose) in RENAMES.items():
        (source, target), verbose = ((new, old), OLD_VERBOSE[old]) if backwards else ((old, new), new_verbose)
        for action in ("add", "change", "delete", "view"):
            if permissions.filter(codename=f"{action}_{target}").exists():
                continue  # already created under the new name: leave both
            permissions.filter(codename=f"{action}_{source}").update(
                codename=f"{action}_{target}", name=f"Can {action} {verbose}"
            )


def _forwards(apps, schema_editor) -> None:
    _rename_permissions(apps, schema_editor)


def _backwards(apps, schema_editor) -> None:
    _rename_permissions(apps, schema_editor, backwards=True)


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("digests", "0002_digest_cursor_by_transaction"),
    ]

    operations = [
        migrations.RenameModel(old_name="Digest", new_name="WeeklyDigest"),
        migrations.RenameModel(old_name="DigestSchedule", new_name="RecipientDigestSchedule"),
        migrations.RunPython(_forwards, _backwards),
    ]
