from __future__ import annotations

from procrastinate import JobContext

from jobs import queues
from jobs.registry import job_task
from jobs.retry import will_retry
from llm.client import ProviderError
from notes import services


@job_task(
    name="notes.enrich",
    queue=queues.ENRICHMENT,
    retries=3,  # waits about 2 s, 4 s, 8 s
    retry_base_seconds=2,
    pass_context=True,
)
def note_enrich(context: JobContext, *, note_id: int) -> str:
    try:
        return services.note_enrich(note_id=note_id)
    except ProviderError as exc:
        services.note_enrichment_failed(note_id=note_id, error=str(exc), final=not will_retry(context, exc))
        raise
