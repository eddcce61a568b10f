"""Snoozes (jobs/tasking/snooze.py: `raise JobSnooze(seconds=...)`): how many times each job has
asked to run again later, on jobs_job_info. The worker middleware adds one per snooze in the same
upsert that records it, and fails the job once the task's `max_snoozes` is passed: a task that
snoozes forever ends instead of being claimed again without end. A default of 0 is instant to add.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("jobs", "0010_batch_streams")]

    operations = [
        migrations.AddField(
            model_name="jobinfo",
            name="snoozes",
            field=models.IntegerField(db_default=0, default=0),
        ),
    ]
