"""Cost per request from usage and prices."""

from __future__ import annotations

import pytest

from llmkit.config import DeploymentConfig
from llmkit.pricing import PRICES, Price, price_for
from llmkit.types import Usage


def usage(prompt: int, completion: int, cached: int | None = None) -> Usage:
    details = {"cached_tokens": cached} if cached is not None else None
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion, prompt_tokens_details=details)  # fmt: skip


def test_cost_counts_cached_tokens_at_their_price() -> None:
    price = Price(input=2.0, output=8.0, cached_input=0.5)
    assert price.cost(usage(1_000_000, 0)) == pytest.approx(2.0)
    assert price.cost(usage(1000, 500)) == pytest.approx((1000 * 2 + 500 * 8) / 1e6)
    assert price.cost(usage(1000, 0, cached=400)) == pytest.approx((600 * 2 + 400 * 0.5) / 1e6)
    # A provider that cannot price cached tokens charges them in full.
    assert Price(2.0, 8.0).cost(usage(1000, 0, cached=400)) == pytest.approx(2000 / 1e6)


def test_config_price_wins_over_table_and_unknown_is_none() -> None:
    table = price_for("openai", "gpt-4o-mini", None)
    assert table is PRICES["openai/gpt-4o-mini"]
    configured = DeploymentConfig(provider="openai", model="gpt-4o-mini", input_cost_per_mtok=9)
    assert price_for("openai", "gpt-4o-mini", configured) == Price(9.0, 0.0)
    unpriced = DeploymentConfig(provider="openai", model="gpt-4o-mini")
    assert price_for("openai", "gpt-4o-mini", unpriced) is table
    assert price_for("local", "llama", None) is None
