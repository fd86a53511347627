"""Prices imported from genai-prices keep their exact values, tiers and dates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from genai_prices import types as gp
from genai_prices.data_snapshot import DataSnapshot, get_snapshot

from meterline.catalog import Catalog, PriceBook, genai_import, parse_price, seed_versions
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


def acme(price: gp.ModelPrice, monkeypatch: pytest.MonkeyPatch) -> PriceVersion:
    """The one version genai-prices' ``price`` imports as, for a made-up provider."""
    provider = gp.Provider(
        id="acme",
        name="Acme",
        api_pattern="https://acme",
        models=[gp.ModelInfo(id="acme-1", match=gp.ClauseEquals("acme-1"), prices=price)],
    )
    monkeypatch.setattr(
        genai_import, "get_snapshot", lambda: DataSnapshot([provider], from_auto_update=False)
    )
    return only(import_versions(), "acme-1", "acme")


CACHE_USAGE = TokenUsage(
    input_tokens=10_000,
    cached_input_tokens=4_000,
    cache_write_5m_tokens=2_000,
    cache_write_1h_tokens=1_000,
    output_tokens=500,
)


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ({}, {}),  # no cache rate at all: every cache token at the input rate
        ({"cache_read_mtok": Decimal("0.3")}, {"cache_read": "0.3"}),
        ({"cache_write_mtok": Decimal("3.75")}, {"cache_write_5m": "3.75"}),  # 1h: the write rate
        (
            {
                "cache_read_mtok": Decimal(0),
                "cache_write_mtok": Decimal(1),
                "cache_write_1h_mtok": Decimal(6),
            },
            {"cache_read": "0", "cache_write_5m": "1", "cache_write_1h": "6"},  # 0 is free
        ),
    ],
)
def test_a_cache_rate_not_given_costs_the_same_on_every_path(
    theirs: dict[str, Decimal], ours: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    price = gp.ModelPrice(input_mtok=Decimal(3), output_mtok=Decimal(15), **theirs)
    imported = acme(price, monkeypatch).compile()
    rates = {"input": "3", "output": "15"} | ours
    by_api = parse_price(
        {"model": "acme-1", "provider": "acme", "effective_from": "2024-01-01", "rates": rates}
    ).compile()
    seed_entry = {"model": "acme-1", "providers": ["acme"], "rates": rates}  # seed.json's form
    by_seed = parse_price(
        {**seed_entry, "provider": "acme", "effective_from": "2024-01-01T00:00:00Z"}, source="seed"
    ).compile()
    genai_total = price.calc_price(
        gp.Usage(
            input_tokens=CACHE_USAGE.input_tokens,
            cache_read_tokens=CACHE_USAGE.cached_input_tokens,
            cache_write_tokens=CACHE_USAGE.cache_write_5m_tokens
            + CACHE_USAGE.cache_write_1h_tokens,
            cache_write_1h_tokens=CACHE_USAGE.cache_write_1h_tokens,
            output_tokens=CACHE_USAGE.output_tokens,
        )
    )["total_price"]
    costs = {p.cost(CACHE_USAGE).picos for p in (imported, by_api, by_seed)}
    assert costs == {genai_total * USD}
    for name in ("cache_read", "cache_write_5m", "cache_write_1h"):
        assert (
            getattr(imported.base, name)
            == getattr(by_api.base, name)
            == getattr(by_seed.base, name)
        )


def test_the_seed_and_the_import_agree_on_cache_tokens(imported: list[PriceVersion]) -> None:
    # the seed gives gemini-2.5-pro no cache-write rate, genai-prices neither: the input rate
    seeded = Catalog(seed_versions()).price_for("gemini-2.5-pro", "google", datetime.now(UTC))
    genai = only(imported, "gemini-2.5-pro", "google").compile()
    assert seeded is not None
    for total in (100_000, 250_000):  # both tiers
        usage = TokenUsage(
            input_tokens=total,
            cached_input_tokens=total // 4,
            cache_write_5m_tokens=total // 8,
            cache_write_1h_tokens=total // 16,
            output_tokens=1_000,
        )
        assert seeded.cost(usage).picos == genai.cost(usage).picos


def test_an_absurd_rate_in_genai_prices_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    price = gp.ModelPrice(input_mtok=Decimal("1e30"), output_mtok=Decimal(1))
    provider = gp.Provider(
        id="acme",
        name="Acme",
        api_pattern="https://acme",
        models=[gp.ModelInfo(id="acme-1", match=gp.ClauseEquals("acme-1"), prices=price)],
    )
    monkeypatch.setattr(
        genai_import, "get_snapshot", lambda: DataSnapshot([provider], from_auto_update=False)
    )
    result = import_prices()
    assert result.versions == []
    assert result.skipped == {"rate out of bounds": 1}


def genai_model(provider: str, name: str, *, by_id: bool = False) -> gp.ModelInfo | None:
    """The model genai-prices prices ``name`` as (``by_id``: the model of that id)."""
    providers = get_snapshot().providers
    found = next(p for p in providers if p.id == provider)
    own = next((m for m in found.models if m.id == name), None) if by_id else None
    return own or found.find_model(name, all_providers=providers)


@pytest.mark.parametrize(
    ("name", "provider", "model"),
    [
        ("gpt-4o-2024-08-06", "openai", "gpt-4o"),  # an equals clause of gpt-4o
        ("gpt-4.1-mini-2025-04-14", "azure", "gpt-4.1-mini"),  # through OpenAI's models
        ("gpt-4o-2024-05-13", "openai", "gpt-4o-2024-05-13"),  # its own price: $5 / $15
        ("claude-sonnet-4-5-20250929", "anthropic", "claude-sonnet-4-5"),  # a prefix rule
        ("claude-sonnet-4.5-20250929", "anthropic", "claude-sonnet-4-5"),
    ],
)
def test_a_dated_name_costs_what_genai_prices_matches_it_to(
    imported: list[PriceVersion], name: str, provider: str, model: str
) -> None:
    theirs = genai_model(provider, name)  # genai-prices takes no vendor prefix; we do
    name = f"vendor/{name.upper()}"
    assert theirs is not None and theirs.id == model
    price = Catalog(imported).price_for(name, provider, datetime.now(UTC))
    assert price is not None
    assert price.price_id == versions_of(imported, model, provider)[-1].price_id


def test_a_dated_name_genai_prices_does_not_match_is_unpriced(
    imported: list[PriceVersion],
) -> None:
    catalog = Catalog(imported)
    assert genai_model("openai", "gpt-4o-2099-01-01") is None
    assert catalog.price_for("gpt-4o-2099-01-01", "openai", datetime.now(UTC)) is None
    assert catalog.price_for("gpt-4o", "openai", datetime.now(UTC)) is not None


def test_every_alias_imported_costs_what_genai_prices_matches_it_to(
    imported: list[PriceVersion],
) -> None:
    catalog = Catalog(imported)
    now = datetime.now(UTC)
    usage = TokenUsage(input_tokens=1_000, cached_input_tokens=300, output_tokens=77)
    declared = 0
    for version in imported:
        names: list[tuple[str, ...]] = [(alias,) for alias in version.aliases]
        if version.dated_aliases:  # genai-prices may match one spelling of a date only
            names.append((f"{version.model}-20250101", f"{version.model}-2025-01-01"))
        for spellings in names:
            matched = [(n, m) for n in spellings if (m := genai_model(version.provider, n))]
            assert matched, (version.provider, spellings)
            for name, theirs in matched:
                price = catalog.price_for(name, version.provider, now)
                assert price is not None, (version.provider, name)
                expected = theirs.get_prices(now).calc_price(
                    gp.Usage(
                        input_tokens=usage.input_tokens,
                        cache_read_tokens=usage.cached_input_tokens,
                        output_tokens=usage.output_tokens,
                    )
                )["total_price"]
                assert price.cost(usage).picos == expected * USD, (version.provider, name)
            declared += 1
    assert declared > 500


def test_imported_aliases_survive_the_warehouse(warehouse: Warehouse) -> None:
    versions = [v for v in import_versions(["anthropic"]) if v.dated_aliases or v.aliases]
    assert versions
    PriceBook(warehouse).add(versions)
    catalog = PriceBook(warehouse).load()
    price = catalog.price_for("claude-sonnet-4-5-20250929", "anthropic", datetime.now(UTC))
    assert price is not None
    assert price.price_id in {v.price_id for v in versions if v.model == "claude-sonnet-4-5"}
