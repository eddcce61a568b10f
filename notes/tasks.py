from __future__ import annotations

from typing import Any

from django.conf import settings
from procrastinate import JobContext

from core.errors import ProviderError
from jobs import job_progress, job_task, queues, will_retry
from llm.services import LLM_CONCURRENCY_KEY
from notes import services


@job_task(
    name="notes.enrich",
    queue=queues.ENRICHMENT,
    retries=3,  # waits about 2 s, 4 s, 8 s
    retry_base_seconds=2,
    pass_context=True,
    # Per user, across workers: a bulk import's enrichments take turns with everyone else's
    # instead of filling every slot (and the Anthropic rate limit) with one user's notes.
    concurrency=settings.LLM_CONCURRENCY_PER_USER,
    concurrency_key=LLM_CONCURRENCY_KEY,
)
def note_enrich(context: JobContext, *, note_id: int) -> str:
    try:
        return services.note_enrich(note_id=note_id)
    except ProviderError as exc:
        services.note_enrichment_failed(note_id=note_id, error=str(exc), final=not will_retry(context, exc))
        raise


@job_task(name="notes.import", queue=queues.IMPORTS, retries=3, pass_context=True)
def note_import(context: JobContext, *, import_id: int) -> dict[str, Any]:
    def report(progress: services.ImportProgress) -> None:
        # Committed at once, so the jobs API, its stream and the dashboard show it; raises
        # JobAborted when an operator aborts the job, between two batches.
        job_progress(
            context,
            processed=progress.processed,
            total=progress.total,
            import_id=import_id,
            imported=progress.imported,
            duplicates=progress.duplicates,
            skipped=progress.skipped,
        )

    try:
        note_import = services.note_import_run(import_id=import_id, on_progress=report)
    except Exception as exc:
        if not will_retry(context, exc):
            services.note_import_failed(import_id=import_id, reason=f"{type(exc).__name__}: {exc}")
        raise
    return {
        "import_id": import_id,
        "status": note_import.status,
        "total": note_import.total,
        "imported": note_import.imported,
        "duplicates": note_import.duplicates,
        "skipped": note_import.skipped,
    }


@job_task(name="notes.import_enriched", queue=queues.IMPORTS, retries=3)
def note_import_enriched(
    *, import_id: int, batch_id: int, total: int, succeeded: int, failed: int, cancelled: int
) -> dict[str, Any]:
    """The callback of an import's enrichment batch; its result is the import's webhook payload."""
    return services.note_import_enriched(
        import_id=import_id, batch_id=batch_id, total=total, succeeded=succeeded, failed=failed, cancelled=cancelled
    )
