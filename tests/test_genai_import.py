"""Prices imported from genai-prices keep their exact values, tiers and dates."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meterline.catalog import Catalog, PriceBook
from meterline.catalog.genai_import import import_versions
from meterline.pricing import PriceVersion, TokenUsage
from meterline.warehouse import Warehouse


@pytest.fixture(scope="module")
def imported() -> list[PriceVersion]:
    return import_versions()


def find(versions: list[PriceVersion], model: str, provider: str) -> PriceVersion:
    matches = [v for v in versions if v.model == model and v.provider == provider]
    assert matches, f"{provider}/{model} not imported"
    return matches[0]


def test_gpt_4_1_mini_matches_the_gateways_price(imported: list[PriceVersion]) -> None:
    rates = find(imported, "gpt-4.1-mini", "openai").rates
    assert (rates.input, rates.output, rates.cache_read) == (
        Decimal("0.4"),
        Decimal("1.6"),
        Decimal("0.1"),
    )
    assert (
        Catalog(imported).price_for("openai/gpt-4.1-mini", "openai", datetime.now(UTC)) is not None
    )


def test_anthropic_cache_writes_and_long_context_tier(imported: list[PriceVersion]) -> None:
    sonnet = find(imported, "claude-sonnet-4-5", "anthropic")
    assert (sonnet.rates.cache_write_5m, sonnet.rates.cache_write_1h) == (
        Decimal("3.75"),
        Decimal("6"),
    )
    [tier] = sonnet.tiers
    assert tier.above_input_tokens == 200_000
    # 250k input, 50k of it cache reads, 1k output: all at the long-context rates
    cost = sonnet.compile().cost(
        TokenUsage(input_tokens=250_000, cached_input_tokens=50_000, output_tokens=1_000)
    )
    assert cost.tier == ">200000"
    assert cost.picos == (200_000 * 6 + 50_000 * Decimal("0.6") + 1_000 * Decimal("22.5")) * 10**6


def test_a_provider_filter_and_every_version_compiles(imported: list[PriceVersion]) -> None:
    only_openai = import_versions(["openai"])
    assert only_openai and {v.provider for v in only_openai} == {"openai"}
    assert all(v.source == "genai-prices" for v in imported)
    for version in imported:
        version.compile()  # an inexact rate would raise


def test_import_into_the_warehouse_is_idempotent(warehouse: Warehouse) -> None:
    versions = import_versions(["mistral"])  # a provider no other test prices with
    book = PriceBook(warehouse)
    first = book.add(versions)
    assert len(first) == len({v.price_id for v in versions})
    assert book.add(versions) == []
