from __future__ import annotations

from decimal import Decimal

from llm.pricing import cost_usd, price_for


def test_cost_from_the_price_table():
    assert cost_usd(model="claude-sonnet-4-5", input_tokens=1_000_000, output_tokens=1_000_000) == Decimal(18)
    assert cost_usd(model="claude-haiku-4-5", input_tokens=2000, output_tokens=1000) == Decimal("0.007")


def test_dated_model_ids_and_unknown_models():
    assert price_for("claude-haiku-4-5-20251001") == price_for("claude-haiku-4-5")
    assert price_for("claude-sonnet-9") == price_for("claude-sonnet-4-5")
    # Unknown: priced as the dearest model, so the budget errs on the side of spending less.
    assert price_for("something-new") == (Decimal(15), Decimal(75))
