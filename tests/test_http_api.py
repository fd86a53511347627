"""The HTTP API over the real warehouse (chDB): usage, catalog, health, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from litestar.testing import AsyncTestClient

from conftest import unique
from meterline.lib.warehouse import USAGE_EVENT_COLUMNS, Warehouse
from services.api.app import create_app

Client = AsyncTestClient  # type: ignore[type-arg]


@pytest.fixture
async def client(warehouse: Warehouse) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(warehouse)) as test_client:
        yield test_client


def row(
    account: str, at: datetime, model: str, cost: str, *, tokens: int = 100, priced: int = 1
) -> tuple[object, ...]:
    values = {c: 0 for c in USAGE_EVENT_COLUMNS} | {
        "account_id": account,
        "event_id": unique("ev"),
        "occurred_at": at,
        "received_at": at,
        "api_key_id": "k",
        "model": model,
        "provider": "openai",
        "status": "ok",
        "input_tokens": tokens,
        "output_tokens": tokens // 2,
        "priced": priced,
        "price_id": "pv_test" if priced else "",
        "price_tier": "base",
        "cost_usd": Decimal(cost),
        "sign": 1,
        "provider_usage_json": "",
    }
    return tuple(values[c] for c in USAGE_EVENT_COLUMNS)


@pytest.fixture
def account_with_usage(warehouse: Warehouse) -> str:
    account = unique("acct")
    warehouse.insert(
        "usage_events",
        USAGE_EVENT_COLUMNS,
        [
            row(
                account, datetime(2026, 11, 2, 9, 15, tzinfo=UTC), "gpt-4.1-mini", "0.000000037500"
            ),
            row(account, datetime(2026, 11, 2, 9, 59, 59, 999000, tzinfo=UTC), "gpt-4.1", "1.25"),
            row(account, datetime(2026, 11, 3, 0, 0, tzinfo=UTC), "gpt-4.1-mini", "0.1"),
            row(account, datetime(2026, 11, 3, 1, 0, tzinfo=UTC), "mystery", "0", priced=0),
            row(account, datetime(2026, 12, 1, 0, 0, tzinfo=UTC), "gpt-4.1", "9"),  # next month
        ],
    )
    return account


async def test_usage_totals_and_groups(client: Client, account_with_usage: str) -> None:
    response = await client.get(
        f"/v1/accounts/{account_with_usage}/usage",
        params={
            "from": "2026-11-01T00:00:00Z",
            "to": "2026-12-01T00:00:00Z",
            "group_by": "model,day",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["totals"]["requests"] == 4
    assert body["totals"]["unpriced_requests"] == 1
    assert body["totals"]["input_tokens"] == 400
    assert body["totals"]["cost_usd"] == "1.3500000375"
    assert [(g["day"], g["model"], g["requests"], g["cost_usd"]) for g in body["groups"]] == [
        ("2026-11-02", "gpt-4.1", 1, "1.25"),
        ("2026-11-02", "gpt-4.1-mini", 1, "0.0000000375"),
        ("2026-11-03", "gpt-4.1-mini", 1, "0.1"),
        ("2026-11-03", "mystery", 1, "0"),
    ]


async def test_rollup_and_raw_events_agree(client: Client, account_with_usage: str) -> None:
    url = f"/v1/accounts/{account_with_usage}/usage"
    hourly = (
        await client.get(url, params={"from": "2026-11-02T09:00:00Z", "to": "2026-11-02T10:00:00Z"})
    ).json()
    raw = (
        await client.get(url, params={"from": "2026-11-02T08:30:00Z", "to": "2026-11-02T10:00:00Z"})
    ).json()
    cut = (
        await client.get(
            url, params={"from": "2026-11-02T09:00:00Z", "to": "2026-11-02T09:59:59.999Z"}
        )
    ).json()
    assert hourly["source"] == "usage_hourly"
    assert raw["source"] == "usage_events"
    assert hourly["totals"] == raw["totals"]
    assert hourly["totals"]["cost_usd"] == "1.2500000375"
    assert cut["totals"]["requests"] == 1  # the end is exclusive, to the millisecond


async def test_usage_errors_are_json_with_a_reason(client: Client) -> None:
    bad_group = await client.get("/v1/accounts/a/usage", params={"group_by": "colour"})
    assert bad_group.status_code == 400
    assert bad_group.json()["detail"] == "cannot group by colour; choose from model, provider, day"
    backwards = await client.get(
        "/v1/accounts/a/usage",
        params={"from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z"},
    )
    assert backwards.status_code == 400
    assert "must be after start" in backwards.json()["detail"]
    not_a_time = await client.get("/v1/accounts/a/usage", params={"from": "yesterday"})
    assert not_a_time.status_code == 400


async def test_an_account_without_usage_has_zero_totals(client: Client) -> None:
    body = (await client.get(f"/v1/accounts/{unique('nobody')}/usage")).json()
    assert body["totals"]["requests"] == 0
    assert body["totals"]["cost_usd"] == "0"
    assert body["groups"] == []


async def test_catalog_lists_and_adds_price_versions(client: Client) -> None:
    model = unique("test-model")
    current = (
        await client.get(
            "/v1/catalog/prices", params={"model": "openai/gpt-4.1-mini", "provider": "openai"}
        )
    ).json()
    assert [p["rates"]["input"] for p in current] == ["0.40"]
    assert current[0]["rates"]["cache_read"] == "0.10"

    first = {
        "model": model,
        "provider": "acme",
        "effective_from": "2025-01-01T00:00:00Z",
        "rates": {"input": "1", "output": "2"},
    }
    second = first | {
        "effective_from": "2026-01-01T00:00:00Z",
        "rates": {"input": "0.0375", "output": "2"},
    }
    created = await client.post("/v1/catalog/prices", json=first)
    assert created.status_code == 201, created.text
    assert created.json()["created"] is True
    assert (await client.post("/v1/catalog/prices", json=first)).json()["created"] is False
    await client.post("/v1/catalog/prices", json=second)

    versions = (await client.get("/v1/catalog/versions", params={"model": model})).json()
    assert [v["rates"]["input"] for v in versions] == ["1", "0.0375"]
    in_2025 = (
        await client.get(
            "/v1/catalog/prices", params={"model": model, "at": "2025-06-01T00:00:00Z"}
        )
    ).json()
    assert [v["rates"]["input"] for v in in_2025] == ["1"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            {
                "model": "m",
                "provider": "p",
                "effective_from": "2026-01-01T00:00:00Z",
                "rates": {"input": 0.1, "output": "1"},
            },
            "not a float",
        ),
        (
            {
                "model": "m",
                "provider": "p",
                "effective_from": "2026-01-01T00:00:00Z",
                "rates": {"input": "1"},
            },
            "missing rate(s): output",
        ),
        (
            {"model": "m", "provider": "p", "rates": {"input": "1", "output": "1"}},
            "missing 'effective_from'",
        ),
        (
            {
                "model": "m",
                "provider": "p",
                "effective_from": "2026-01-01T00:00:00Z",
                "rates": {"input": "0.00000001", "output": "1"},
            },
            "more than 6 decimal places",
        ),
        (
            {
                "model": "m",
                "provider": "p",
                "effective_from": "2026-01-01T00:00:00Z",
                "rates": {"input": "-1", "output": "1"},
            },
            "negative",
        ),
    ],
)
async def test_an_invalid_price_is_refused_with_its_reason(
    client: Client, body: dict[str, object], reason: str
) -> None:
    response = await client.post("/v1/catalog/prices", json=body)
    assert response.status_code == 400
    assert reason in response.json()["detail"]


async def test_health_readiness_and_openapi(client: Client) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "warehouse": "chdb"}
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/v1/accounts/{account_id}/usage" in schema["paths"]
