"""Traces across the job boundary (core/tracing.py): the W3C trace context of whoever deferred a
job, on procrastinate_jobs itself.

- `trace_context`: the propagator's carrier as JSON (`{"traceparent": "00-...-01"}`, with
  `tracestate` or `baggage` when there are any), written by the defer statement
  (jobs/tasking/defer.py) when tracing is on and the defer runs inside a span (a request, or
  another job). NULL otherwise: tracing off, Procrastinate's own inserts (periodic jobs), or
  jobs deferred before this migration. The worker reads it by the job's id, only when tracing
  is on, and parents the job's span on it; every attempt reads the same value, so a retried
  job's attempts are sibling spans of one trace.
- On the job row, not in its args (the task's kwargs, shown by the jobs API and the dashboard,
  and part of what a task is called with) nor in jobs_job_info (written only when a job has an
  owner, a deduplication key or a callback). Nullable, no default: adding it is instant.
"""

from django.db import migrations

FORWARD = "ALTER TABLE procrastinate_jobs ADD COLUMN trace_context jsonb;"

BACKWARD = "ALTER TABLE procrastinate_jobs DROP COLUMN trace_context;"


class Migration(migrations.Migration):
    dependencies = [("jobs", "0012_concurrency_limits")]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
