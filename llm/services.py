from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from django.conf import settings
from django.db import transaction

from core.errors import ProviderError
from core.quotas import quota_adjust, quota_erase, quota_take
from llm import pricing
from llm.client import ClaudeClient, Completion, ProviderTimedOut, estimate_input_tokens
from llm.models import LlmUsage
from llm.selectors import llm_budget_usd, llm_spend_this_month

# The concurrency key of every task that calls Claude for a user (job_task(concurrency_key=...)):
# they share settings.LLM_CONCURRENCY_PER_USER slots per user.
LLM_CONCURRENCY_KEY = "llm:user:{owner_id}"


class LlmUnavailable(Exception):
    """No call was made: no API key, or a budget (this month's, or the user's today) is spent.
    Degrade, don't fail."""


def _daily_key(owner_id: int) -> str:
    return f"llm-usd:{owner_id}"


def llm_erase_owner(owner_id: int) -> None:
    """The owner's daily budget counters (core/erasure.py). Their ledger rows stay, for the
    monthly spend, without the owner (the foreign key sets it NULL)."""
    quota_erase(key=_daily_key(owner_id))


@dataclass(frozen=True)
class _Reservation:
    owner_id: int
    day: date  # the database's UTC day when it was taken: settled on that day's row
    amount: Decimal


def _daily_reserve(
    *, owner_id: int | None, model: str, system: str, prompt: str, max_tokens: int
) -> _Reservation | None:
    """Reserve the call's worst-case cost against the owner's budget for today, committed before
    the call, so parallel calls of one user never spend past it together. None: no daily budget."""
    limit = Decimal(str(settings.LLM_DAILY_BUDGET_USD_PER_USER))
    if owner_id is None or limit <= 0:
        return None
    worst = pricing.cost_usd(
        model=model, input_tokens=estimate_input_tokens(system=system, prompt=prompt), output_tokens=max_tokens
    )
    with transaction.atomic():
        taken = quota_take(key=_daily_key(owner_id), amount=worst, limit=limit)
    if not taken.allowed:
        raise LlmUnavailable(
            f"the daily LLM budget of ${limit} per user is used up for today (${taken.used:.4f} spent or in flight)"
        )
    return _Reservation(owner_id=owner_id, day=taken.day, amount=worst)


def llm_complete(
    *, purpose: str, system: str, prompt: str, owner_id: int | None = None, max_tokens: int = 1024
) -> Completion:
    """One Claude call, checked against the budgets first and written to the ledger.

    The monthly budget is for everyone; the daily one is per user (its share of a call is
    reserved before the call and settled to the real cost after). A call that timed out after
    it was sent is in the ledger too, at its worst-case cost, marked `estimated`.
    Raises LlmUnavailable (nothing called) or core.errors.ProviderError (the call failed).
    """
    if not settings.ANTHROPIC_API_KEY:
        raise LlmUnavailable("no ANTHROPIC_API_KEY is configured")
    spent, budget = llm_spend_this_month(), llm_budget_usd()
    if spent >= budget:
        raise LlmUnavailable(f"the monthly LLM budget of ${budget} is used up (${spent:.4f} spent)")

    client = ClaudeClient.from_settings()
    reserved = _daily_reserve(
        owner_id=owner_id, model=client.model, system=system, prompt=prompt, max_tokens=max_tokens
    )
    try:
        completion = client.complete(system=system, prompt=prompt, max_tokens=max_tokens)
    except ProviderTimedOut as exc:
        _ledger_write(purpose=purpose, owner_id=owner_id, usage=exc.usage, estimated=True, reserved=reserved)
        raise
    except ProviderError:
        # Refused or unreachable: nothing was billed, the reservation goes back.
        _ledger_write(purpose=purpose, owner_id=owner_id, usage=None, estimated=False, reserved=reserved)
        raise
    _ledger_write(purpose=purpose, owner_id=owner_id, usage=completion, estimated=False, reserved=reserved)
    return completion


@transaction.atomic
def _ledger_write(
    *, purpose: str, owner_id: int | None, usage: Completion | None, estimated: bool, reserved: _Reservation | None
) -> None:
    """The ledger row of a call (none when it cost nothing) and the settling of its reservation
    to that cost, in one transaction."""
    cost = usage.cost_usd if usage is not None else Decimal(0)
    if usage is not None:
        LlmUsage.objects.create(
            owner_id=owner_id,
            purpose=purpose,
            model=usage.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_usd=cost,
            estimated=estimated,
        )
    if reserved is not None:
        quota_adjust(key=_daily_key(reserved.owner_id), day=reserved.day, delta=cost - reserved.amount)
