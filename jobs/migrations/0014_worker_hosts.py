"""Worker hosts: the host each worker runs on, on its procrastinate_workers row.

- `jobs_host`: settings.WORKER_HOSTNAME (the machine's name unless set), written by the worker
  right after Procrastinate registers it (jobs/engine/manager.py: `register_worker`), and again
  when it registers anew after an outage. Shown by the dashboard's live workers. Namespaced like
  the columns of ours on procrastinate_jobs (migration 0008), so a column Procrastinate adds one
  day cannot clash.
- Nullable, no default: adding it is instant, and rows of workers started before it stay NULL.
"""

from django.db import migrations

FORWARD = "ALTER TABLE procrastinate_workers ADD COLUMN jobs_host text;"

BACKWARD = "ALTER TABLE procrastinate_workers DROP COLUMN jobs_host;"


class Migration(migrations.Migration):
    dependencies = [("jobs", "0013_trace_context")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
