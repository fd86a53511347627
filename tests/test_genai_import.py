"""Prices imported from genai-prices keep their exact values, tiers and dates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from genai_prices import types as gp
from genai_prices.data_snapshot import DataSnapshot, get_snapshot

from meterline.catalog import Catalog, PriceBook, genai_import
from meterline.catalog.genai_import import (
    DEFAULT_EFFECTIVE_FROM,
    ImportResult,
    import_prices,
    import_versions,
)
from meterline.catalog.pricing import PriceVersion
from meterline.lib.warehouse import Warehouse
from meterline.tokens import TokenUsage

USD = 10**12  # picos
M = 10**6  # tokens per million: a rate of $r per million is r × 10**6 picos per token


@pytest.fixture(scope="module")
def result() -> ImportResult:
    return import_prices()


@pytest.fixture(scope="module")
def imported(result: ImportResult) -> list[PriceVersion]:
    return result.versions


def versions_of(versions: list[PriceVersion], model: str, provider: str) -> list[PriceVersion]:
    found = sorted(
        (v for v in versions if v.model == model and v.provider == provider),
        key=lambda v: v.effective_from,
    )
    assert found, f"{provider}/{model} not imported"
    return found


def only(versions: list[PriceVersion], model: str, provider: str) -> PriceVersion:
    [version] = versions_of(versions, model, provider)
    return version


def test_gpt_4_1_mini_keeps_its_exact_rates(imported: list[PriceVersion]) -> None:
    version = only(imported, "gpt-4.1-mini", "openai")
    rates = version.rates
    assert (rates.input, rates.output, rates.cache_read) == (
        Decimal("0.40"),
        Decimal("1.60"),
        Decimal("0.10"),
    )
    assert all(type(v) is Decimal for v in (rates.input, rates.output, rates.cache_read))
    assert rates.reasoning is None  # reasoning at the output rate
    assert rates.request == 0
    assert version.tiers == ()
    assert version.source == "genai-prices"
    assert version.effective_from == DEFAULT_EFFECTIVE_FROM == datetime(2024, 1, 1, tzinfo=UTC)
    compiled = version.compile().base
    assert (compiled.input, compiled.output, compiled.cache_read) == (400_000, 1_600_000, 100_000)


def test_the_catalog_finds_an_imported_price(imported: list[PriceVersion]) -> None:
    price = Catalog(imported).price_for("openai/gpt-4.1-mini", "openai", datetime.now(UTC))
    assert price is not None
    cost = price.cost(TokenUsage(input_tokens=1_000_000, cached_input_tokens=200_000))
    assert cost.picos == 800_000 * 400_000 + 200_000 * 100_000  # $0.32 + $0.02
    assert cost.picos == USD * 34 // 100


def test_anthropic_cache_writes_5m_and_1h(imported: list[PriceVersion]) -> None:
    rates = only(imported, "claude-sonnet-4-5", "anthropic").rates
    assert (rates.input, rates.cache_read, rates.cache_write_5m, rates.cache_write_1h) == (
        Decimal("3"),
        Decimal("0.3"),
        Decimal("3.75"),
        Decimal("6"),
    )


def test_a_long_context_tier_prices_every_token_above_its_threshold(
    imported: list[PriceVersion],
) -> None:
    version = only(imported, "gemini-2.5-pro", "google")
    [tier] = version.tiers
    assert tier.above_input_tokens == 200_000  # genai-prices Tier(start=200000): input > 200000
    assert (tier.rates.input, tier.rates.output, tier.rates.cache_read) == (
        Decimal("2.5"),
        Decimal("15"),
        Decimal("0.25"),
    )
    # genai-prices gives no cache-write rate, so writes cost the input rate of the tier in force
    assert (version.rates.cache_write_5m, tier.rates.cache_write_5m) == (
        Decimal("1.25"),
        Decimal("2.5"),
    )
    price = version.compile()
    long = price.cost(
        TokenUsage(input_tokens=250_000, cached_input_tokens=50_000, output_tokens=1_000)
    )
    assert long.tier == ">200000"
    assert long.picos == 200_000 * 2_500_000 + 50_000 * 250_000 + 1_000 * 15_000_000
    assert long.picos == USD * 5275 // 10_000  # $0.5275
    at_threshold = price.cost(TokenUsage(input_tokens=200_000, output_tokens=1_000))
    assert at_threshold.tier == "base"
    assert at_threshold.picos == 200_000 * 1_250_000 + 1_000 * 10_000_000


def test_two_tiers_of_one_model(imported: list[PriceVersion]) -> None:
    # genai-prices: every rate tiered at start=32000 and start=256000
    version = only(imported, "qwen/qwen3.7-flash", "openrouter")
    assert [(t.above_input_tokens, t.rates.input, t.rates.output) for t in version.tiers] == [
        (32_000, Decimal("0.1"), Decimal("0.4")),
        (256_000, Decimal("0.2"), Decimal("0.8")),
    ]
    assert version.compile().cost(TokenUsage(input_tokens=256_001)).picos == 256_001 * 200_000


def test_rates_tiered_at_different_thresholds_merge_into_one_tier_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """genai-prices tiers each rate on its own; each threshold carries every rate in force."""
    price = gp.ModelPrice(
        input_mtok=gp.TieredPrices(base=Decimal("1"), tiers=[gp.Tier(100_000, Decimal("2"))]),
        output_mtok=gp.TieredPrices(base=Decimal("4"), tiers=[gp.Tier(200_000, Decimal("6"))]),
        cache_read_mtok=Decimal("0.1"),
    )
    provider = gp.Provider(
        id="acme",
        name="Acme",
        api_pattern="https://acme",
        models=[gp.ModelInfo(id="acme-1", match=gp.ClauseEquals("acme-1"), prices=price)],
    )
    monkeypatch.setattr(
        genai_import, "get_snapshot", lambda: DataSnapshot([provider], from_auto_update=False)
    )
    version = only(import_versions(), "acme-1", "acme")
    rates = [(version.rates.input, version.rates.output, version.rates.cache_read)]
    rates += [(t.rates.input, t.rates.output, t.rates.cache_read) for t in version.tiers]
    assert [t.above_input_tokens for t in version.tiers] == [100_000, 200_000]
    assert rates == [
        (Decimal("1"), Decimal("4"), Decimal("0.1")),
        (Decimal("2"), Decimal("4"), Decimal("0.1")),
        (Decimal("2"), Decimal("6"), Decimal("0.1")),
    ]
    # no cache-write rate: writes cost the input rate in force, tier by tier, as in genai-prices
    assert [t.rates.cache_write_5m for t in version.tiers] == [Decimal("2"), Decimal("2")]
    compiled = version.compile()
    for total in (100_000, 100_001, 200_000, 200_001):
        usage = TokenUsage(input_tokens=total, cached_input_tokens=10_000, output_tokens=1_000)
        theirs = price.calc_price(
            gp.Usage(input_tokens=total, cache_read_tokens=10_000, output_tokens=1_000)
        )["total_price"]
        assert compiled.cost(usage).picos == theirs * USD


def test_a_dated_price_becomes_a_later_version(imported: list[PriceVersion]) -> None:
    # genai-prices: o3 cost $10 / $40 until 2025-06-10, then $2 / $8
    old, new = versions_of(imported, "o3", "openai")
    assert old.effective_from == DEFAULT_EFFECTIVE_FROM
    assert new.effective_from == datetime(2025, 6, 10, tzinfo=UTC)
    assert (old.rates.input, old.rates.output, new.rates.input, new.rates.output) == (
        Decimal("10"),
        Decimal("40"),
        Decimal("2"),
        Decimal("8"),
    )
    catalog = Catalog(imported)
    usage = TokenUsage(input_tokens=1_000, output_tokens=1_000)
    before = catalog.price_for("o3", "openai", new.effective_from - timedelta(microseconds=1))
    after = catalog.price_for("o3", "openai", new.effective_from)
    assert before is not None and after is not None
    assert before.cost(usage).picos == 1_000 * 10 * M + 1_000 * 40 * M
    assert after.cost(usage).picos == 1_000 * 2 * M + 1_000 * 8 * M


def test_a_request_fee_per_thousand_becomes_a_fee_per_request(
    imported: list[PriceVersion],
) -> None:
    rates = only(imported, "sonar-pro", "perplexity").rates  # $14 per 1000 requests
    assert rates.request == Decimal("0.014")
    assert only(imported, "sonar-pro", "perplexity").compile().cost(TokenUsage()).picos == (
        14 * USD // 1000
    )


def test_time_of_day_prices_are_skipped_not_flattened(result: ImportResult) -> None:
    # DeepSeek's undated price is the off-peak one: importing it alone would underbill peak hours
    assert not [
        v for v in result.versions if v.provider == "deepseek" and v.model == "deepseek-chat"
    ]
    assert result.skipped["time-of-day price"] >= 1


def test_an_inexact_rate_is_skipped_never_rounded(result: ImportResult) -> None:
    # genai-prices has $0.0833333333333333 per million cache writes for this one
    assert not [v for v in result.versions if v.model == "google/gemini-2.5-flash"]
    assert result.skipped["inexact rate"] >= 1


def test_every_imported_version_is_exact_and_unique(result: ImportResult) -> None:
    assert len(result.versions) > 1000
    assert all(v.source == "genai-prices" for v in result.versions)
    assert all(v.effective_from >= DEFAULT_EFFECTIVE_FROM for v in result.versions)
    for version in result.versions:
        version.compile()  # an inexact rate would raise
    ids = [v.price_id for v in result.versions]
    assert len(ids) == len(set(ids))


def test_a_provider_filter(imported: list[PriceVersion]) -> None:
    only_openai = import_versions(["openai"])
    assert only_openai and {v.provider for v in only_openai} == {"openai"}
    assert {v.price_id for v in only_openai} == {
        v.price_id for v in imported if v.provider == "openai"
    }
    assert import_versions(["OpenAI"]) == only_openai
    with pytest.raises(ValueError, match="opneai"):
        import_versions(["opneai"])


def test_azure_gets_the_openai_models_genai_prices_falls_back_to(
    imported: list[PriceVersion],
) -> None:
    azure = only(imported, "gpt-4.1-mini", "azure")
    assert azure.spec_json() == only(imported, "gpt-4.1-mini", "openai").spec_json()
    # azure has its own text-embedding-3-small, which wins over OpenAI's
    assert len(versions_of(imported, "text-embedding-3-small", "azure")) == 1


def test_effective_from_moves_the_undated_start() -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    versions = import_versions(["openai"], effective_from=start)
    assert min(v.effective_from for v in versions) == start
    assert [v.effective_from for v in versions if v.model == "o3"] == [
        start,
        datetime(2025, 6, 10, tzinfo=UTC),
    ]


def test_every_version_costs_what_genai_prices_computes(imported: list[PriceVersion]) -> None:
    """Cross-check against genai-prices' own calculator, at and just past every threshold."""
    providers = {p.id: p for p in get_snapshot().providers}
    checked = 0
    for version in imported:
        provider = providers[version.provider]
        model = next((m for m in provider.models if m.id == version.model), None) or (
            provider.find_model(version.model, all_providers=list(providers.values()))
        )
        assert model is not None
        standard = model.get_prices(version.effective_from)
        price = version.compile()
        for threshold in [0, *(t.above_input_tokens for t in version.tiers)]:
            for total in (threshold, threshold + 1) if threshold else (1_000,):
                usage = TokenUsage(
                    input_tokens=total,
                    cached_input_tokens=total // 4,
                    cache_write_5m_tokens=total // 8,
                    cache_write_1h_tokens=total // 16,
                    output_tokens=777,
                    reasoning_tokens=333,
                )
                theirs = standard.calc_price(
                    gp.Usage(
                        input_tokens=usage.input_tokens,
                        cache_read_tokens=usage.cached_input_tokens,
                        cache_write_tokens=usage.cache_write_5m_tokens
                        + usage.cache_write_1h_tokens,
                        cache_write_1h_tokens=usage.cache_write_1h_tokens,
                        output_tokens=usage.output_tokens,
                        output_reasoning_tokens=usage.reasoning_tokens,
                    )
                )["total_price"]
                assert price.cost(usage).picos == theirs * USD, (version, usage)
                checked += 1
    assert checked > len(imported)


def test_import_into_the_warehouse_is_idempotent(warehouse: Warehouse) -> None:
    versions = import_versions(["mistral"])  # a provider no other test prices with
    book = PriceBook(warehouse)
    first = book.add(versions)
    assert len(first) == len(versions)
    assert book.add(versions) == []
