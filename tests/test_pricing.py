"""Tokens to money: exact, in one place, for every kind of token."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import pytest

from meterline.catalog import Catalog, PriceBook, model_key, parse_price, seed_versions
from meterline.catalog.catalog import _undated
from meterline.catalog.pricing import LongContextTier, PriceVersion, Rates
from meterline.lib.warehouse import Warehouse
from meterline.lib.warehouse.base import Param, Value
from meterline.money import (
    MAX_EVENT_PICOS,
    MAX_RATE_USD_PER_MTOK,
    MAX_REQUEST_FEE_USD,
    MAX_TOKEN_COUNT,
    WAREHOUSE_INTEGER_DIGITS,
    AmountOutOfBounds,
    MoneyError,
    format_usd,
    picos_to_sql_decimal,
    picos_to_usd,
)
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
    just_before = catalog.price_for("gpt-4.1-mini", "openai", june - timedelta(milliseconds=1))
    from_june = catalog.price_for("gpt-4.1-mini", "openai", june)
    assert just_before is not None and from_june is not None
    assert just_before.price_id == old.price_id
    assert from_june.price_id == new.price_id
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


# --- bounds: no price can overflow a store ---------------------------------------------------


def priced(rates: Mapping[str, object], **extra: object) -> PriceVersion:
    return parse_price(
        {"model": "m", "provider": "p", "effective_from": "2025-01-01T00:00:00Z", "rates": rates}
        | extra
    )


def test_an_absurd_rate_is_refused_naming_the_rate_and_the_bound() -> None:
    # the auditor's case: accepted by POST /v1/catalog/prices, then billing broke for everyone
    with pytest.raises(AmountOutOfBounds, match=r"input rate: 1E\+30 is above the bound of 10000"):
        priced({"input": "1e30", "output": "1"})
    with pytest.raises(AmountOutOfBounds, match=r"cache_read rate: 10000\.000001 is above"):
        priced({"input": "1", "output": "1", "cache_read": "10000.000001"})
    with pytest.raises(AmountOutOfBounds, match=r"request fee: 1000\.5 is above the bound of 1000"):
        priced({"input": "1", "output": "1", "request": "1000.5"})
    with pytest.raises(AmountOutOfBounds, match="tier above 1000 input tokens: output rate"):
        priced(
            {"input": "1", "output": "1"},
            tiers=[{"above_input_tokens": 1000, "rates": {"output": "99999"}}],
        )
    with pytest.raises(AmountOutOfBounds, match="reasoning rate"):
        Rates(input=Decimal(1), output=Decimal(1), reasoning=Decimal("1e5"))
    with pytest.raises(MoneyError, match="negative"):
        Rates(input=Decimal(-1), output=Decimal(1))
    with pytest.raises(MoneyError, match="not a decimal number"):
        priced({"input": True, "output": "1"})


def test_a_tier_threshold_is_a_token_count_within_the_bound() -> None:
    base = {"input": "1", "output": "1"}
    assert priced(base, tiers=[{"above_input_tokens": MAX_TOKEN_COUNT, "rates": {}}]).tiers
    for bad in (MAX_TOKEN_COUNT + 1, -1):
        with pytest.raises(ValueError, match=f"above_input_tokens: {bad} is outside 0 to"):
            priced(base, tiers=[{"above_input_tokens": bad, "rates": {}}])
    for odd in (1.5, True, "1e6", None):
        with pytest.raises(ValueError, match="not a whole number of tokens"):
            priced(base, tiers=[{"above_input_tokens": odd, "rates": {}}])
    with pytest.raises(ValueError, match="two tiers above 10 input tokens"):
        priced(base, tiers=[{"above_input_tokens": 10, "rates": {}}] * 2)


def test_the_dearest_event_fits_every_store() -> None:
    top = str(MAX_RATE_USD_PER_MTOK)
    price = priced(
        {k: top for k in ("input", "output", "cache_read", "reasoning")}
        | {"cache_write_5m": top, "cache_write_1h": top, "request": str(MAX_REQUEST_FEE_USD)}
    ).compile()
    worst = price.cost(
        TokenUsage(
            input_tokens=MAX_TOKEN_COUNT,
            cached_input_tokens=MAX_TOKEN_COUNT // 3,
            cache_write_5m_tokens=MAX_TOKEN_COUNT // 3,
            cache_write_1h_tokens=MAX_TOKEN_COUNT // 3,
            output_tokens=MAX_TOKEN_COUNT,
            reasoning_tokens=MAX_TOKEN_COUNT // 2,
        )
    ).picos
    assert worst == MAX_EVENT_PICOS == 2_001_000 * USD  # $2,001,000
    assert worst < 2**63  # even a signed 64-bit count of pico-dollars holds one event
    total = picos_to_sql_decimal(10**12 * worst)  # a trillion of them in Decimal(38, 12)
    whole = total.split(".")[0]
    assert len(whole) == 19 <= WAREHOUSE_INTEGER_DIGITS
    assert format_usd(10**12 * worst) == whole


def test_rates_at_the_bounds_are_accepted() -> None:
    version = priced({"input": "10000", "output": "0.000001", "request": "1000"})
    compiled = version.compile().base
    assert (compiled.input, compiled.output, compiled.request) == (10**10, 1, 1000 * USD)


# --- exact money at any size -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("picos", "text"),
    [
        (10**20 * USD + 1, "100000000000000000000.000000000001"),  # $10^20 and 1 pico
        (-(10**20 * USD + 1), "-100000000000000000000.000000000001"),
        (10**26 * USD - 1, "99999999999999999999999999.999999999999"),  # Decimal(38, 12)'s top
        (1, "0.000000000001"),
        (-1, "-0.000000000001"),
        (USD, "1"),
        (-USD * 5 // 2, "-2.5"),
        (0, "0"),
    ],
)
def test_money_is_formatted_exactly_from_integers(picos: int, text: str) -> None:
    assert format_usd(picos) == text
    amount = picos_to_usd(picos)
    assert amount == Decimal(text)  # the constructor is exact: no context, no rounding
    assert amount.as_tuple().exponent == -12
    assert format_usd(amount) == text
    assert Decimal(picos_to_sql_decimal(picos)) == amount


def test_decimal_amounts_are_formatted_without_rounding() -> None:
    # 40 significant digits, more than the default decimal context's 28
    assert format_usd(Decimal("123456789012345678901234567.8901234567890")) == (
        "123456789012345678901234567.890123456789"
    )
    assert format_usd(Decimal("1E+21")) == "1000000000000000000000"
    assert format_usd(Decimal("-0.000")) == "0"
    with pytest.raises(MoneyError):
        format_usd(Decimal("NaN"))


def test_a_rate_with_too_many_digits_is_refused_not_rounded() -> None:
    # 32 significant digits: a 28-digit context would have made this exactly $1 per million
    with pytest.raises(MoneyError, match="more than 6 decimal places"):
        version(input="1.0000000000000000000000000000001")


# --- a cache rate not given costs the input rate ---------------------------------------------


def test_cache_rates_not_given_cost_the_input_rate() -> None:
    price = priced({"input": "3", "output": "15"})
    assert (price.rates.cache_read, price.rates.cache_write_5m, price.rates.cache_write_1h) == (
        None,
        None,
        None,
    )
    base = price.compile().base
    assert base.cache_read == base.cache_write_5m == base.cache_write_1h == base.input == 3 * 10**6
    usage = TokenUsage(
        input_tokens=1_000,
        cached_input_tokens=500,
        cache_write_5m_tokens=200,
        cache_write_1h_tokens=100,
    )
    assert price.compile().cost(usage).picos == 1_000 * 3 * 10**6  # as if no cache at all


def test_a_1h_write_rate_not_given_costs_the_5m_write_rate() -> None:
    # as genai-prices prices it: a 1-hour write is a cache write
    base = priced({"input": "3", "output": "15", "cache_write_5m": "3.75"}).compile().base
    assert (base.cache_read, base.cache_write_5m, base.cache_write_1h) == (
        3_000_000,
        3_750_000,
        3_750_000,
    )


def test_a_rate_given_as_0_stays_0() -> None:
    price = priced({"input": "3", "output": "15", "cache_read": "0", "cache_write_1h": "0"})
    base = price.compile().base
    assert (base.cache_read, base.cache_write_5m, base.cache_write_1h) == (0, 3_000_000, 0)


def test_the_stored_form_keeps_what_was_given() -> None:
    price = priced({"input": "3", "output": "15", "cache_read": "0"})
    assert price.spec_json()["rates"] == {
        "input": "3",
        "output": "15",
        "cache_read": "0",
        "cache_write_5m": None,
        "cache_write_1h": None,
        "reasoning": None,
        "request": "0",
    }
    again = priced(cast(Mapping[str, object], price.spec_json()["rates"]))
    assert again.price_id == price.price_id and again.compile() == price.compile()


def test_a_version_stored_before_the_fallback_keeps_its_meaning() -> None:
    # to_json used to write "0" for every rate not given: those versions billed cache tokens at
    # $0 and keep doing so (a new version corrects them); a version without the key falls back
    old = {"input": "0.40", "output": "1.60", "cache_read": "0.10", "reasoning": None}
    stored = priced(old | {"cache_write_5m": "0", "cache_write_1h": "0", "request": "0"})
    assert stored.compile().base.cache_write_5m == 0
    assert priced(old).compile().base.cache_write_5m == 400_000
    # and a fully given version keeps the id it had before nulls existed
    tiered = PriceVersion(
        model="m",
        provider="p",
        effective_from=T0,
        rates=Rates(
            input=Decimal(3),
            output=Decimal(15),
            cache_read=Decimal("0.3"),
            cache_write_5m=Decimal("3.75"),
            cache_write_1h=Decimal(6),
        ),
        tiers=(
            LongContextTier(
                200_000,
                Rates(
                    input=Decimal(6),
                    output=Decimal("22.5"),
                    cache_read=Decimal("0.6"),
                    cache_write_5m=Decimal("7.5"),
                    cache_write_1h=Decimal(12),
                ),
            ),
        ),
    )
    assert tiered.price_id == "pv_223b0357528dc217"


def test_the_seed_gives_every_cache_rate_it_means() -> None:
    for v in seed_versions():
        compiled = v.compile()
        for rates in (compiled.base, *(r for _, r in compiled.tiers)):
            assert rates.cache_read <= rates.input, v.model  # a read never costs more
            if v.provider != "anthropic":  # no cache-write rate: the input rate
                assert rates.cache_write_5m == rates.cache_write_1h == rates.input, v.model


# --- dated names: an alias, or a price of their own, or unpriced -----------------------------

NOW = datetime.now(UTC)


@pytest.mark.parametrize(
    ("name", "provider", "rates"),
    [
        ("gpt-4o", "openai", (2_500_000, 10_000_000)),
        ("gpt-4o-2024-08-06", "openai", (2_500_000, 10_000_000)),  # declared an alias
        ("openai/GPT-4o-2024-11-20", "openai", (2_500_000, 10_000_000)),
        ("gpt-4o-2024-05-13", "openai", (5_000_000, 15_000_000)),  # its own price wins
        ("gpt-4o-2024-05-13", "azure", (5_000_000, 15_000_000)),
        ("gpt-4.1-mini-20250414", "openai", (400_000, 1_600_000)),  # compact date, same name
        ("claude-sonnet-4-5-20250929", "anthropic", (3_000_000, 15_000_000)),
        ("anthropic/claude-sonnet-4.5-20250929", "anthropic", (3_000_000, 15_000_000)),
        ("gpt-4o-2099-01-01", "openai", None),  # a snapshot the catalog does not know
        ("claude-sonnet-4-5-20991231", "anthropic", None),
        ("gpt-4o-2024-08-06", "anthropic", None),
    ],
)
def test_a_dated_name_costs_its_declared_price_or_nothing(
    name: str, provider: str, rates: tuple[int, int] | None
) -> None:
    price = Catalog(seed_versions()).price_for(name, provider, NOW)
    assert (None if price is None else (price.base.input, price.base.output)) == rates


def test_the_seed_aliases_are_dated_snapshots_of_their_model() -> None:
    seeded = seed_versions()
    assert sum(len(v.aliases) for v in seeded) >= 20
    for v in seeded:
        for alias in v.aliases:
            assert _undated(model_key(alias)) == model_key(v.model) != model_key(alias)


def test_an_alias_tier_is_the_models_tier() -> None:
    catalog = Catalog(seed_versions())
    usage = TokenUsage(input_tokens=250_000, cached_input_tokens=50_000, output_tokens=1_000)
    dated = catalog.price_for("claude-sonnet-4-5-20250929", "anthropic", NOW)
    undated = catalog.price_for("claude-sonnet-4-5", "anthropic", NOW)
    assert dated is not None and dated is undated
    assert dated.cost(usage).tier == ">200000"


def at(start: str, model: str = "gpt-4o", **extra: object) -> PriceVersion:
    return parse_price(
        {
            "model": model,
            "provider": "openai",
            "effective_from": start,
            "rates": {"input": extra.pop("input", "2.50"), "output": "10"},
        }
        | extra
    )


def check_schedule_agrees(catalog: Catalog, name: str, instants: list[datetime]) -> None:
    """``schedule`` (what a warehouse join reads) agrees with ``price_for`` at each instant."""
    schedule = catalog.schedule(name, "openai")
    for instant in instants:
        in_force = [price for start, price in schedule if start <= instant]
        expected = catalog.price_for(name, "openai", instant)
        assert (in_force[-1] if in_force else None) is expected, (name, instant)


def test_without_an_alias_a_dated_name_is_unpriced_never_mispriced() -> None:
    # the auditor's case: gpt-4o-2024-05-13 was billed gpt-4o's $2.50 / $10 instead of $5 / $15
    catalog = Catalog([at("2024-01-01T00:00:00Z")])
    assert catalog.price_for("gpt-4o", "openai", NOW) is not None
    assert catalog.price_for("gpt-4o-2024-05-13", "openai", NOW) is None
    assert catalog.schedule("gpt-4o-2024-05-13", "openai") == []


def test_an_alias_holds_from_its_first_declaration_through_later_prices() -> None:
    first = at("2024-01-01T00:00:00Z")
    declared = at("2025-01-01T00:00:00Z", input="2.00", aliases=["gpt-4o-2024-08-06"])
    later = at("2026-01-01T00:00:00Z", input="1.50")  # the model's next price: all its names
    catalog = Catalog([later, first, declared])
    instants = [datetime(y, m, 1, tzinfo=UTC) for y in (2024, 2025, 2026) for m in (1, 6)]
    assert [
        p and p.price_id
        for p in (catalog.price_for("gpt-4o-2024-08-06", "openai", t) for t in instants)
    ] == [None, None, declared.price_id, declared.price_id, later.price_id, later.price_id]
    check_schedule_agrees(catalog, "gpt-4o-2024-08-06", instants)


def test_its_own_price_wins_wherever_it_is_in_force() -> None:
    undated = at("2024-01-01T00:00:00Z", aliases=["gpt-4o-2024-08-06"])
    own = at("2025-06-01T00:00:00Z", model="gpt-4o-2024-08-06", input="3.00")
    catalog = Catalog([undated, own])
    before = datetime(2025, 5, 31, tzinfo=UTC)
    after = datetime(2025, 6, 1, tzinfo=UTC)
    assert catalog.price_for("gpt-4o-2024-08-06", "openai", before) is catalog.price_for(
        "gpt-4o", "openai", before
    )
    price = catalog.price_for("gpt-4o-2024-08-06", "openai", after)
    assert price is not None and price.price_id == own.price_id
    check_schedule_agrees(catalog, "gpt-4o-2024-08-06", [before, after, NOW])


def test_dated_aliases_make_every_dated_name_an_alias() -> None:
    version = at("2024-01-01T00:00:00Z", model="claude-x", dated_aliases=True)
    assert version.spec_json()["dated_aliases"] is True
    catalog = Catalog([version])
    for name in ("claude-x-20250101", "claude-x-2031-12-31", "anthropic/Claude-X-20250101"):
        assert catalog.price_for(name, "openai", NOW) is not None, name
    assert catalog.price_for("claude-x-mini-20250101", "openai", NOW) is None
    assert catalog.price_for("claude-x-v2", "openai", NOW) is None  # not a date


def test_one_alias_of_two_models_is_unpriced(caplog: pytest.LogCaptureFixture) -> None:
    catalog = Catalog(
        [
            at("2024-01-01T00:00:00Z", aliases=["snapshot-2025-01-01"]),
            at("2024-01-01T00:00:00Z", model="gpt-4o-mini", aliases=["snapshot-2025-01-01"]),
        ]
    )
    assert catalog.price_for("snapshot-2025-01-01", "openai", NOW) is None
    assert "snapshot-2025-01-01 is declared an alias of gpt-4o and gpt-4o-mini" in caplog.text


def test_aliases_are_checked_and_stored_with_the_version() -> None:
    version = at("2024-01-01T00:00:00Z", aliases=[" gpt-4o-2024-11-20", "gpt-4o-2024-08-06"])
    assert version.aliases == ("gpt-4o-2024-08-06", "gpt-4o-2024-11-20")
    assert version.spec_json()["aliases"] == ["gpt-4o-2024-08-06", "gpt-4o-2024-11-20"]
    assert "aliases" not in at("2024-01-01T00:00:00Z").spec_json()  # ids of others unchanged
    assert version.price_id != at("2024-01-01T00:00:00Z").price_id
    for bad, reason in [
        ("gpt-4o-2024-08-06", "a list of model names"),
        (["GPT-4o"], "the model's own name"),
        (["gpt-4o-2024-08-06", "gpt-4o-2024.08.06"], "are the same name"),
        ([""], "is not a model name"),
        ([3], "is not a model name"),
    ]:
        with pytest.raises(ValueError, match=reason):
            at("2024-01-01T00:00:00Z", aliases=bad)
    with pytest.raises(ValueError, match="dated_aliases"):
        at("2024-01-01T00:00:00Z", dated_aliases="yes")


# --- the price book: one bad stored version never stops the rest ----------------------------


class WithStoredRows:
    """The session warehouse, with extra ``price_versions`` rows only this test sees."""

    def __init__(self, warehouse: Warehouse, rows: list[dict[str, object]]) -> None:
        self.inner = warehouse
        self.rows = rows
        self.name = warehouse.name

    def query(self, sql: str, params: Mapping[str, Param] | None = None) -> list[dict[str, Any]]:
        rows = self.inner.query(sql, params)
        return rows + self.rows if "FROM price_versions ORDER BY" in sql else rows

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Value]]) -> None:
        self.inner.insert(table, columns, rows)

    def command(self, sql: str, params: Mapping[str, Param] | None = None) -> None:
        self.inner.command(sql, params)

    def close(self) -> None:
        pass


def stored_row(price_id: str, model: str, spec: object) -> dict[str, object]:
    return {
        "price_id": price_id,
        "model": model,
        "provider": "audit",
        "effective_from": datetime(2024, 1, 1),
        "source": "manual",
        "spec_json": spec if isinstance(spec, str) else json.dumps(spec),
    }


def test_the_price_book_skips_a_bad_stored_version_and_loads_the_rest(
    warehouse: Warehouse, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"rates": {"input": "1", "output": "2"}, "tiers": []}
    rows = [
        stored_row("pv_absurd", "absurd", {"rates": {"input": "1e30", "output": "1"}, "tiers": []}),
        stored_row("pv_garbled", "garbled", "{not json"),
        stored_row("pv_no_rates", "no-rates", {"tiers": []}),
        stored_row("pv_float", "float", {"rates": {"input": 0.4, "output": "1"}, "tiers": []}),
        stored_row("pv_good", "good", good),
        stored_row("pv_old", "old", {"rates": {"input": "1", "output": "2", "cache_read": "0"}}),
    ]
    book = PriceBook(WithStoredRows(warehouse, rows))
    catalog = book.load()
    ours = {str(row["price_id"]) for row in rows}  # the session's warehouse may hold others
    skipped = {s.price_id: s for s in catalog.skipped if s.price_id in ours}
    assert set(skipped) == {"pv_absurd", "pv_garbled", "pv_no_rates", "pv_float"}
    assert "input rate: 1E+30 is above the bound of 10000" in skipped["pv_absurd"].reason
    assert (skipped["pv_absurd"].model, skipped["pv_absurd"].provider) == ("absurd", "audit")
    assert "pv_absurd (audit/absurd) skipped" in caplog.text
    assert catalog.price_for("absurd", "audit", NOW) is None  # unpriced, not mispriced
    good_price = catalog.price_for("good", "audit", NOW)
    assert good_price is not None and good_price.price_id == "pv_good"
    assert good_price.base.cache_read == 1_000_000  # no cache-read key: the input rate
    old = catalog.price_for("old", "audit", NOW)
    assert old is not None and old.base.cache_read == 0  # stored as "0": still free
    assert catalog.price_for("gpt-4.1-mini", "openai", NOW) is not None  # the seed, as ever
    assert book.add([]) == []


def test_aliases_survive_the_warehouse(warehouse: Warehouse) -> None:
    provider = f"alias-test-{NOW.timestamp():.0f}"
    version = parse_price(
        {
            "model": "gpt-9",
            "provider": provider,
            "effective_from": "2024-01-01T00:00:00Z",
            "rates": {"input": "1", "output": "2"},
            "aliases": ["gpt-9-2030-01-01"],
            "dated_aliases": True,
        }
    )
    book = PriceBook(warehouse)
    assert book.add([version]) == [version]
    assert book.add([version]) == []
    catalog = book.load()
    [loaded] = [v for v in catalog.versions if v.provider == provider]
    assert loaded == version
    for name in ("gpt-9-2030-01-01", "gpt-9-20310101"):
        price = catalog.price_for(name, provider, NOW)
        assert price is not None and price.price_id == version.price_id


def test_the_first_design_case_prices_exactly_as_before() -> None:
    # openai/gpt-4.1-mini at $0.40 input, $1.60 output, $0.10 cache read per million tokens
    price = Catalog(seed_versions()).price_for("openai/gpt-4.1-mini", "openai", NOW)
    assert price is not None
    usage = TokenUsage(input_tokens=10_000, cached_input_tokens=4_000, output_tokens=2_000)
    # 6,000 × $0.40 + 4,000 × $0.10 + 2,000 × $1.60 per million = $0.006
    assert price.cost(usage).picos == (6_000 * 400_000 + 4_000 * 100_000 + 2_000 * 1_600_000)
    assert format_usd(price.cost(usage).picos) == "0.006"
