"""The ledger's totals by purpose and model as counters kept by a trigger, so /metrics reads a
few rows and deleting ledger rows doesn't lower them (issue 11, item 6). CREATE TRIGGER locks
llm_usage against writes until this migration commits, so the backfill counts exactly the rows
the trigger did not see."""

from django.db import migrations, models

# One upsert per INSERT statement (a transition table, not a per-row trigger), on the writer's
# shard; ORDER BY takes the row locks in one order so writers of one shard cannot deadlock.
_CREATE = """
CREATE FUNCTION llm_usage_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO llm_usage_counters AS c (purpose, model, shard, calls, input_tokens, output_tokens, cost_usd)
    SELECT purpose, model, pg_backend_pid() % 8, count(*), sum(input_tokens), sum(output_tokens), sum(cost_usd)
      FROM new_rows GROUP BY purpose, model ORDER BY purpose, model
    ON CONFLICT (purpose, model, shard) DO UPDATE
       SET calls = c.calls + EXCLUDED.calls,
           input_tokens = c.input_tokens + EXCLUDED.input_tokens,
           output_tokens = c.output_tokens + EXCLUDED.output_tokens,
           cost_usd = c.cost_usd + EXCLUDED.cost_usd;
    RETURN NULL;
END
$$;
CREATE TRIGGER llm_usage_count
    AFTER INSERT ON llm_usage REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llm_usage_count();
INSERT INTO llm_usage_counters (purpose, model, shard, calls, input_tokens, output_tokens, cost_usd)
SELECT purpose, model, 0, count(*), sum(input_tokens), sum(output_tokens), sum(cost_usd)
  FROM llm_usage GROUP BY purpose, model;
"""
_DROP = """
DROP TRIGGER llm_usage_count ON llm_usage;
DROP FUNCTION llm_usage_count();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("llm", "0003_ledger_time_from_the_database"),
    ]

    operations = [
        migrations.CreateModel(
            name="LlmUsageCounter",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("purpose", models.CharField(max_length=50)),
                ("model", models.CharField(max_length=100)),
                ("shard", models.SmallIntegerField()),
                ("calls", models.BigIntegerField(default=0)),
                ("input_tokens", models.BigIntegerField(default=0)),
                ("output_tokens", models.BigIntegerField(default=0)),
                ("cost_usd", models.DecimalField(decimal_places=6, default=0, max_digits=20)),
            ],
            options={
                "db_table": "llm_usage_counters",
                "constraints": [
                    models.UniqueConstraint(fields=("purpose", "model", "shard"), name="llm_usage_counter_key")
                ],
            },
        ),
        migrations.RunSQL(_CREATE, _DROP),
    ]
