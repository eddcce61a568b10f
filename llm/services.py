from __future__ import annotations

from decimal import Decimal

from django.conf import settings

from llm.client import ClaudeClient, Completion
from llm.models import LlmUsage
from llm.selectors import llm_spend_this_month


class LlmUnavailable(Exception):
    """No call was made: no API key, or this month's budget is spent. Degrade, don't fail."""


def llm_budget_usd() -> Decimal:
    return Decimal(str(settings.LLM_MONTHLY_BUDGET_USD))


def llm_complete(
    *, purpose: str, system: str, prompt: str, owner_id: int | None = None, max_tokens: int = 1024
) -> Completion:
    """One Claude call, checked against the monthly budget first and written to the ledger.

    Raises LlmUnavailable (nothing called) or llm.client.ProviderError (the call failed).
    """
    if not settings.ANTHROPIC_API_KEY:
        raise LlmUnavailable("no ANTHROPIC_API_KEY is configured")
    spent, budget = llm_spend_this_month(), llm_budget_usd()
    if spent >= budget:
        raise LlmUnavailable(f"the monthly LLM budget of ${budget} is used up (${spent:.4f} spent)")

    completion = ClaudeClient.from_settings().complete(system=system, prompt=prompt, max_tokens=max_tokens)
    LlmUsage.objects.create(
        owner_id=owner_id,
        purpose=purpose,
        model=completion.model,
        input_tokens=completion.input_tokens,
        output_tokens=completion.output_tokens,
        cost_usd=completion.cost_usd,
    )
    return completion
