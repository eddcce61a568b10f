"""USD per million tokens (input, output). Unknown models are priced as the dearest known
model of their family, so the budget errs on the side of spending less."""

from __future__ import annotations

from decimal import Decimal

PRICES_PER_MTOK: dict[str, tuple[Decimal, Decimal]] = {
    "claude-haiku-4-5": (Decimal("1"), Decimal("5")),
    "claude-3-5-haiku": (Decimal("0.80"), Decimal("4")),
    "claude-sonnet-4-5": (Decimal("3"), Decimal("15")),
    "claude-sonnet-4": (Decimal("3"), Decimal("15")),
    "claude-opus-4-5": (Decimal("5"), Decimal("25")),
    "claude-opus-4-1": (Decimal("15"), Decimal("75")),
    "claude-opus-4": (Decimal("15"), Decimal("75")),
}
_FALLBACK = {"haiku": "claude-haiku-4-5", "sonnet": "claude-sonnet-4-5", "opus": "claude-opus-4-1"}
_MILLION = Decimal(1_000_000)


def price_for(model: str) -> tuple[Decimal, Decimal]:
    # Dated ids ("claude-haiku-4-5-20251001") share the price of their alias.
    for known in sorted(PRICES_PER_MTOK, key=len, reverse=True):
        if model.startswith(known):
            return PRICES_PER_MTOK[known]
    for family, known in _FALLBACK.items():
        if family in model:
            return PRICES_PER_MTOK[known]
    return PRICES_PER_MTOK["claude-opus-4-1"]


def cost_usd(*, model: str, input_tokens: int, output_tokens: int) -> Decimal:
    price_in, price_out = price_for(model)
    return (price_in * input_tokens + price_out * output_tokens) / _MILLION
