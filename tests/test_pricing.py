"""Tokens to money: exact, in one place, for every kind of token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from meterline.catalog import Catalog, model_key, parse_price, seed_versions
from meterline.catalog.pricing import LongContextTier, PriceVersion, Rates
from meterline.money import MoneyError, format_usd, picos_to_sql_decimal
from meterline.tokens import TokenUsage

USD = 10**12  # pico-dollars
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def version(**rates: str) -> PriceVersion:
    base = {"input": "3", "output": "15"} | rates
    return PriceVersion(
        model="m",
        provider="p",
        effective_from=T0,
        rates=Rates(**{k: Decimal(v) for k, v in base.items()}),
    )


def test_every_kind_of_token_at_its_own_rate() -> None:
    price = version(
        cache_read="0.30",
        cache_write_5m="3.75",
        cache_write_1h="6",
        reasoning="20",
        request="0.001",
    ).compile()
    usage = TokenUsage(
        input_tokens=10_000,
        cached_input_tokens=5_000,
        cache_write_5m_tokens=2_000,
        cache_write_1h_tokens=1_000,
        output_tokens=3_000,
        reasoning_tokens=1_000,
    )
    # per million: 2,000 uncached × 3 + 5,000 × 0.30 + 2,000 × 3.75 + 1,000 × 6
    #              + 2,000 × 15 + 1,000 × 20, plus a $0.001 request fee
    expected = (6_000 + 1_500 + 7_500 + 6_000 + 30_000 + 20_000) * USD // 10**6 + USD // 1000
    assert price.cost(usage).picos == expected == 72_000_000_000


def test_reasoning_costs_the_output_rate_by_default() -> None:
    price = version().compile()
    with_reasoning = TokenUsage(output_tokens=1_000, reasoning_tokens=900)
    without = TokenUsage(output_tokens=1_000)
    assert price.cost(with_reasoning).picos == price.cost(without).picos == 15_000_000_000


def test_long_context_tier_replaces_every_rate_past_its_threshold() -> None:
    price = PriceVersion(
        model="m",
        provider="p",
        effective_from=T0,
        rates=Rates(input=Decimal(3), output=Decimal(15), cache_read=Decimal("0.3")),
        tiers=(
            LongContextTier(
                200_000, Rates(input=Decimal(6), output=Decimal("22.5"), cache_read=Decimal("0.6"))
            ),
        ),
    ).compile()
    at_threshold = TokenUsage(input_tokens=200_000, output_tokens=1_000)
    past = TokenUsage(input_tokens=200_001, cached_input_tokens=100_000, output_tokens=1_000)
    assert price.cost(at_threshold).tier == "base"
    assert price.cost(at_threshold).picos == (200_000 * 3 + 1_000 * 15) * 10**6
    cost = price.cost(past)
    assert cost.tier == ">200000"
    assert cost.picos == (100_001 * 6 + 100_000 * Decimal("0.6") + 1_000 * Decimal("22.5")) * 10**6


def test_small_rates_are_exact() -> None:
    # $0.0375 per million tokens: 37,500 pico-dollars a token, no rounding anywhere
    price = version(input="0.0375").compile()
    cost = price.cost(TokenUsage(input_tokens=1))
    assert cost.picos == 37_500
    assert format_usd(cost.picos) == "0.0000000375"
    assert picos_to_sql_decimal(cost.picos) == "0.000000037500"
    assert format_usd(price.cost(TokenUsage(input_tokens=3)).picos) == "0.0000001125"


def test_a_rate_finer_than_the_unit_is_refused() -> None:
    with pytest.raises(MoneyError, match="more than 6 decimal places"):
        version(input="0.0000001")


def test_floats_are_refused_as_money() -> None:
    with pytest.raises(MoneyError, match="not a float"):
        parse_price(
            {
                "model": "m",
                "provider": "p",
                "effective_from": "2025-01-01T00:00:00Z",
                "rates": {"input": 0.4, "output": "1.6"},
            }
        )


def test_the_price_in_force_at_the_event_time_applies() -> None:
    old = parse_price(
        {
            "model": "gpt-4.1-mini",
            "provider": "openai",
            "effective_from": "2025-01-01T00:00:00Z",
            "rates": {"input": "0.40", "output": "1.60", "cache_read": "0.10"},
        }
    )
    new = parse_price(
        {
            "model": "gpt-4.1-mini",
            "provider": "openai",
            "effective_from": "2026-06-01T00:00:00Z",
            "rates": {"input": "0.30", "output": "1.20"},
        }
    )
    catalog = Catalog([new, old])
    june = datetime(2026, 6, 1, tzinfo=UTC)
    assert (
        catalog.price_for("gpt-4.1-mini", "openai", june - timedelta(milliseconds=1)).price_id
        == old.price_id
    )
    assert catalog.price_for("gpt-4.1-mini", "openai", june).price_id == new.price_id
    assert catalog.price_for("gpt-4.1-mini", "openai", datetime(2024, 1, 1, tzinfo=UTC)) is None
    assert catalog.price_for("gpt-4.1-mini", "azure", june) is None


@pytest.mark.parametrize(
    "name", ["gpt-4.1-mini", "openai/gpt-4.1-mini", "GPT-4.1-Mini", "gpt-4.1-mini-2025-04-14"]
)
def test_seed_catalog_has_the_gateways_gpt_4_1_mini_price(name: str) -> None:
    price = Catalog(seed_versions()).price_for(name, "openai", datetime.now(UTC))
    assert price is not None
    # the seeds: $0.40 input, $1.60 output, $0.10 cache read per million tokens
    assert (price.base.input, price.base.output, price.base.cache_read) == (
        400_000,
        1_600_000,
        100_000,
    )


def test_model_key_ignores_prefix_case_and_dots() -> None:
    assert model_key("anthropic/claude-sonnet-4.5") == model_key("claude-sonnet-4-5")


def test_same_content_same_price_id() -> None:
    assert version().price_id == version().price_id
    assert version().price_id != version(input="3.5").price_id
