"""Plans and quota windows: the rules, without servers."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import ValidationError

from meterline.money import PICOS_PER_USD
from meterline.quotas.plans import PlanLimits, PlanVersion, model_matches
from meterline.quotas.windows import Window, window_bounds, window_id


@pytest.mark.parametrize(
    ("timezone", "before", "after", "new_month_starts"),
    [
        # Tokyo is UTC+9: its December starts at 15:00 UTC on November 30
        ("Asia/Tokyo", "2026-11-30T14:59:59", "2026-11-30T15:00:00", "2026-11-30T15:00:00"),
        # Los Angeles is UTC-8 in December: its December starts at 08:00 UTC
        (
            "America/Los_Angeles",
            "2026-12-01T07:59:59",
            "2026-12-01T08:00:00",
            "2026-12-01T08:00:00",
        ),
        ("UTC", "2026-11-30T23:59:59", "2026-12-01T00:00:00", "2026-12-01T00:00:00"),
    ],
)
def test_a_month_starts_at_the_accounts_midnight(
    timezone: str, before: str, after: str, new_month_starts: str
) -> None:
    def at(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)

    assert window_id(Window.MONTH, at(before), timezone) == "2026-11"
    assert window_id(Window.MONTH, at(after), timezone) == "2026-12"
    start, _ = window_bounds(Window.MONTH, at(after), timezone)
    _, end_of_november = window_bounds(Window.MONTH, at(before), timezone)
    assert start == end_of_november == at(new_month_starts)


def test_a_day_across_a_dst_change_lasts_23_hours() -> None:
    start, end = window_bounds(
        Window.DAY, datetime(2026, 3, 8, 12, tzinfo=UTC), "America/Los_Angeles"
    )
    assert (start.hour, end.hour, (end - start).total_seconds()) == (8, 7, 23 * 3600)


def test_charge_is_cost_times_multiplier_plus_fee_to_the_pico() -> None:
    plan = PlanVersion(plan_id="pro", price_multiplier="1.25", request_fee_usd="0.001")
    assert plan.charge_picos(PICOS_PER_USD) == PICOS_PER_USD * 125 // 100 + PICOS_PER_USD // 1000
    # half a pico-dollar rounds up, less rounds down
    assert PlanVersion(plan_id="x", price_multiplier="1.5").charge_picos(3) == 5
    assert PlanVersion(plan_id="x", price_multiplier="1.000001").charge_picos(500_000) == 500_001
    assert PlanVersion(plan_id="x", price_multiplier="1.000001").charge_picos(499_999) == 499_999
    assert PlanVersion(plan_id="x").charge_picos(7) == 7  # defaults: 1 and 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("price_multiplier", 1.5),  # a float
        ("price_multiplier", "1.0000001"),  # more than 6 places
        ("price_multiplier", "1001"),
        ("request_fee_usd", "-1"),
        ("request_fee_usd", "0.0000000000001"),  # below a pico-dollar
    ],
)
def test_sell_prices_are_exact_and_bounded(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        PlanVersion.model_validate({"plan_id": "x", field: value})


def test_spend_caps_are_exact_decimal_strings() -> None:
    assert PlanLimits.model_validate(
        {"spend_per_month_usd": "25.00"}
    ).spend_per_month_usd == Decimal("25.00")
    with pytest.raises(ValidationError, match="spend_per_month_usd"):
        PlanLimits.model_validate({"spend_per_month_usd": 25.0})
    with pytest.raises(ValidationError, match="requests_per_minute"):
        PlanLimits.model_validate({"requests_per_minute": 0})
    with pytest.raises(ValidationError):
        PlanLimits.model_validate({"requests_per_hour": 5})  # no such limit: refused


def test_models_are_matched_as_the_catalog_matches_names() -> None:
    limits = PlanLimits(models_allowed=["gpt-4.1*", "claude-sonnet-4.5"], models_refused=["*-nano"])
    assert limits.model_allowed("openai/GPT-4.1-mini")
    assert limits.model_allowed("anthropic/claude-sonnet-4-5")
    assert not limits.model_allowed("gpt-4.1-nano")
    assert not limits.model_allowed("gpt-4o")
    assert model_matches("gpt-4o*", "openai/gpt-4o-2024-08-06")
