"""The HTTP API over the real warehouse (chDB): usage, catalog, health, errors.

Authentication is on, as in production: the clients present the admin key
(who may do everything; who else may is tests/test_http_auth.py's matrix).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from conftest import bearer, unique
from meterline.accounts import KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.lib.settings import HttpSettings
from meterline.lib.warehouse import Warehouse, WarehouseError
from meterline.lib.warehouse.base import Param, Value
from meterline.money import usd_to_picos
from meterline.tokens import TokenUsage
from meterline.usage.clickhouse import ClickHouseUsageStore
from meterline.usage.model import PricedEvent
from services.api.app import create_app

Client = AsyncTestClient[Litestar]


@pytest.fixture
def make_app(key_ring: KeyRing, accounts: Accounts) -> Callable[..., Litestar]:
    """``create_app`` with the tests' keys and accounts."""

    def make(warehouse: Warehouse, **options: Any) -> Litestar:
        return create_app(warehouse, auth=key_ring, accounts=accounts, **options)

    return make


@contextlib.asynccontextmanager
async def admin_client(app: Litestar, admin_key: IssuedKey) -> AsyncIterator[Client]:
    """A client that presents the admin key with every request."""
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(bearer(admin_key))
        yield test_client


@pytest.fixture
async def client(
    warehouse: Warehouse, make_app: Callable[..., Litestar], admin_key: IssuedKey
) -> AsyncIterator[Client]:
    async with admin_client(make_app(warehouse), admin_key) as test_client:
        yield test_client


def event(
    account: str,
    at: datetime,
    model: str,
    cost: str,
    *,
    tokens: int = 100,
    priced: bool = True,
    charge: str | None = None,
) -> PricedEvent:
    """A stored event; ``charge`` (default: the cost) as a plan would have set it."""
    return PricedEvent(
        account_id=account,
        event_id=unique("ev"),
        api_key_id="k",
        model=model,
        provider="openai",
        occurred_at=at,
        received_at=at,
        status="ok",
        usage=TokenUsage(input_tokens=tokens, output_tokens=tokens // 2),
        latency_ms=0,
        ttft_ms=0,
        price_id="pv_test" if priced else "",
        price_tier="base",
        cost_picos=usd_to_picos(Decimal(cost)),
        provider_usage_json="",
        kafka_partition=0,
        kafka_offset=0,
        charge_picos=usd_to_picos(Decimal(cost if charge is None else charge)),
        plan_id="" if charge is None else "pro",
        plan_version=0 if charge is None else 1,
    )


@pytest.fixture
def account_with_usage(warehouse: Warehouse) -> str:
    """Usage stored as the pipeline stores it: the events, then their rollup recounted."""
    account = unique("acct")
    ClickHouseUsageStore(warehouse).insert_priced(
        [
            event(
                account, datetime(2026, 11, 2, 9, 15, tzinfo=UTC), "gpt-4.1-mini", "0.000000037500"
            ),
            event(
                account,
                datetime(2026, 11, 2, 9, 59, 59, 999000, tzinfo=UTC),
                "gpt-4.1",
                "1.25",
                charge="1.5635",
            ),
            event(account, datetime(2026, 11, 3, 0, 0, tzinfo=UTC), "gpt-4.1-mini", "0.1"),
            event(account, datetime(2026, 11, 3, 1, 0, tzinfo=UTC), "mystery", "0", priced=False),
            event(account, datetime(2026, 12, 1, 0, 0, tzinfo=UTC), "gpt-4.1", "9"),  # next month
        ]
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
    assert body["totals"]["charge_usd"] == "1.6635000375"
    groups = [
        (g["day"], g["model"], g["requests"], g["cost_usd"], g["charge_usd"])
        for g in body["groups"]
    ]
    assert groups == [
        ("2026-11-02", "gpt-4.1", 1, "1.25", "1.5635"),
        ("2026-11-02", "gpt-4.1-mini", 1, "0.0000000375", "0.0000000375"),
        ("2026-11-03", "gpt-4.1-mini", 1, "0.1", "0.1"),
        ("2026-11-03", "mystery", 1, "0", "0"),
    ]


async def test_rollup_and_raw_events_agree(client: Client, account_with_usage: str) -> None:
    url = f"/v1/accounts/{account_with_usage}/usage"

    async def usage(start: str, end: str) -> dict[str, Any]:
        answer = await client.get(url, params={"from": start, "to": end})
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    rolled = await usage("2026-11-02T09:00:00Z", "2026-11-02T10:00:00Z")
    # less than a minute each: read from the raw events only
    first = await usage("2026-11-02T09:15:00Z", "2026-11-02T09:15:00.500Z")
    last = await usage("2026-11-02T09:59:59.500Z", "2026-11-02T10:00:00Z")
    cut = await usage("2026-11-02T09:00:00Z", "2026-11-02T09:59:59.999Z")
    assert rolled["source"] == "usage_minutely"
    assert first["source"] == last["source"] == "usage_events"
    assert rolled["totals"]["cost_usd"] == "1.2500000375"
    assert (first["totals"]["cost_usd"], last["totals"]["cost_usd"]) == ("0.0000000375", "1.25")
    assert rolled["totals"]["charge_usd"] == "1.5635000375"
    assert (first["totals"]["charge_usd"], last["totals"]["charge_usd"]) == (
        "0.0000000375",
        "1.5635",
    )
    assert rolled["totals"]["requests"] == first["totals"]["requests"] + last["totals"]["requests"]
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
    assert body["totals"]["cost_usd"] == body["totals"]["charge_usd"] == "0"
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
            "rates.output: Field required",
        ),
        (
            {"model": "m", "provider": "p", "rates": {"input": "1", "output": "1"}},
            "effective_from: Field required",
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


PRICE: dict[str, Any] = {
    "model": "m",
    "provider": "p",
    "effective_from": "2026-01-01T00:00:00Z",
    "rates": {"input": "1", "output": "2"},
}
DEEP = "[" * 10_000 + "]" * 10_000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rates": ["input"]}, "rates"),
        (PRICE | {"rates": {"input": ["input"], "output": "1"}}, "rates.input"),
        (PRICE | {"rates": {"input": "1", "output": "1", "colour": "1"}}, "rates.colour"),
        (PRICE | {"effective_from": 12345}, "effective_from"),
        (PRICE | {"effective_from": "1899-12-31T00:00:00Z"}, "effective_from"),
        (PRICE | {"effective_from": "10000-01-01T00:00:00Z"}, "effective_from"),
        (PRICE | {"tiers": [{}]}, "tiers[0].above_input_tokens"),
        (PRICE | {"tiers": [{"above_input_tokens": True}]}, "tiers[0].above_input_tokens"),
        (PRICE | {"tiers": [{"above_input_tokens": 10, "rates": []}]}, "tiers[0].rates"),
        (PRICE | {"model": None}, "model"),
        (PRICE | {"model": "x" * 100_000}, "model"),
        (PRICE | {"model": "  "}, "model"),
        (PRICE | {"provider": "p" * 257}, "provider"),
        (PRICE | {"colour": "blue"}, "colour"),
        (PRICE | {"dated_aliases": "yes"}, "dated_aliases"),
        (DEEP, "body"),
        (f'{{"model": "m", "rates": {DEEP}}}', "body"),
        ('{"model": "m"', "body"),
        ("", "body"),
    ],
    ids=lambda value: str(value)[:40] or "empty",
)
async def test_a_malformed_price_is_a_400_naming_the_field(
    client: Client, body: Mapping[str, Any] | str, field: str
) -> None:
    if isinstance(body, str):
        headers = {"content-type": "application/json"}
        response = await client.post("/v1/catalog/prices", content=body, headers=headers)
    else:
        response = await client.post("/v1/catalog/prices", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["status_code"] == 400
    assert f"{field}: " in error["detail"]
    assert field in [problem["key"] for problem in error["extra"]]


async def test_a_refused_price_is_not_stored(client: Client) -> None:
    assert (await client.post("/v1/catalog/prices", json=PRICE | {"model": None})).is_client_error
    versions = (await client.get("/v1/catalog/versions", params={"model": "None"})).json()
    assert versions == []


@pytest.mark.parametrize(
    ("url", "params", "name"),
    [
        ("/v1/accounts/a/usage", {"from": "1800-01-01T00:00:00Z"}, "from"),
        ("/v1/accounts/a/usage", {"from": "1969-12-31T23:59:59Z"}, "from"),
        ("/v1/accounts/a/usage", {"to": "2300-01-01T00:00:00Z"}, "to"),
        ("/v1/accounts/a/usage", {"from": "12345"}, "from"),  # not seconds since 1970
        ("/v1/accounts/a/usage", {"from": "yesterday"}, "from"),
        ("/v1/accounts/a/usage", {"to": "2" * 100}, "to"),
        ("/v1/accounts/a/usage", {"group_by": "colour"}, "group_by"),
        ("/v1/catalog/prices", {"at": "0001-01-01T00:00:00Z"}, "at"),
        ("/v1/catalog/prices", {"model": "m" * 257}, "model"),
    ],
)
async def test_a_bad_parameter_is_a_400_naming_it(
    client: Client, url: str, params: dict[str, str], name: str
) -> None:
    response = await client.get(url, params=params)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["detail"].startswith(f"{name}: ") or name == "group_by"
    assert [(p["key"], p["source"]) for p in error["extra"]] == [(name, "query")]


async def test_the_openapi_documents_every_route(client: Client) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    components = schema["components"]["schemas"]
    routes = [
        ("/v1/accounts/{account_id}/usage", "get", "200"),
        ("/v1/catalog/prices", "get", "200"),
        ("/v1/catalog/versions", "get", "200"),
        ("/v1/catalog/prices", "post", "201"),
    ]
    for path, method, ok in routes:
        operation = schema["paths"][path][method]
        answer = operation["responses"][ok]["content"]["application/json"]["schema"]
        assert "$ref" in answer or "$ref" in answer["items"], (path, method)
        for status in ("400", "503"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert {"status_code", "detail", "extra"} <= set(error["properties"])
    body = schema["paths"]["/v1/catalog/prices"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/PriceIn"}
    price = components["PriceIn"]
    assert set(price["required"]) == {"model", "provider", "effective_from", "rates"}
    assert price["properties"]["model"]["maxLength"] == 256
    # money is decimal text both ways, never a JSON number
    assert components["RatesIn"]["properties"]["input"]["type"] == "string"
    assert components["RatesOut"]["properties"]["input"]["type"] == "string"
    assert components["UsageTotalsOut"]["properties"]["cost_usd"]["type"] == "string"
    usage_parameters = schema["paths"]["/v1/accounts/{account_id}/usage"]["get"]["parameters"]
    assert {p["name"] for p in usage_parameters} == {"account_id", "from", "to", "group_by"}


def _samples(text: str, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for metrics in text_string_to_metric_families(text):
        if metrics.name == family:
            for sample in metrics.samples:
                if sample.name == f"{family}_total":
                    found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_metrics_count_requests_by_route_in_the_given_registry(
    warehouse: Warehouse, make_app: Callable[..., Litestar], admin_key: IssuedKey
) -> None:
    registry = CollectorRegistry()
    Counter("meterline_other_part", "Another part of the process.", registry=registry).inc(3)
    async with admin_client(make_app(warehouse, registry=registry), admin_key) as client:
        await client.get("/v1/catalog/versions", params={"model": "nothing"})
        await client.get("/v1/accounts/a/usage", params={"from": "yesterday"})
        await client.get("/v1/accounts/b/usage", params={"from": "yesterday"})
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    requests = _samples(response.text, "meterline_http_requests")
    versions = (("method", "GET"), ("route", "/v1/catalog/versions"), ("status", "200"))
    usage = (("method", "GET"), ("route", "/v1/accounts/{account_id}/usage"), ("status", "400"))
    assert requests[versions] == 1
    assert requests[usage] == 2  # by template, not by account
    assert _samples(response.text, "meterline_other_part") == {(): 3}
    assert "meterline_http_request_duration_seconds_bucket" in response.text


async def test_metrics_can_be_closed(
    warehouse: Warehouse, make_app: Callable[..., Litestar], admin_key: IssuedKey
) -> None:
    app = make_app(warehouse, settings=HttpSettings.model_validate({"metrics_public": False}))
    async with admin_client(app, admin_key) as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200


class BrokenWarehouse:
    """The session's warehouse, but statements on ``table`` fail as ``error`` says."""

    def __init__(self, warehouse: Warehouse, table: str, error: Exception, *, down: bool) -> None:
        self.warehouse, self.table, self.error, self.down = warehouse, table, error, down
        self.name = warehouse.name

    def query(self, sql: str, params: Mapping[str, Param] | None = None) -> list[dict[str, Any]]:
        if self.table in sql or (self.down and "SELECT 1" in sql):
            raise self.error
        return self.warehouse.query(sql, params)

    def command(self, sql: str, params: Mapping[str, Param] | None = None) -> None:
        self.warehouse.command(sql, params)

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Value]]) -> None:
        self.warehouse.insert(table, columns, rows)

    def close(self) -> None:
        pass


async def test_an_unexpected_error_is_a_500_with_a_logged_traceback(
    warehouse: Warehouse,
    make_app: Callable[..., Litestar],
    admin_key: IssuedKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = BrokenWarehouse(warehouse, "price_versions", KeyError("spec_json"), down=False)
    async with admin_client(make_app(broken), admin_key) as client:
        response = await client.get("/v1/catalog/versions")
    assert response.status_code == 500
    assert response.json() == {"status_code": 500, "detail": "Internal Server Error"}
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == "services.api.app"
    assert "GET /v1/catalog/versions" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)


@pytest.mark.parametrize(
    ("down", "status", "detail"),
    [(True, 503, "warehouse unavailable"), (False, 500, "Internal Server Error")],
    ids=["outage", "refused-statement"],
)
async def test_only_a_warehouse_outage_is_a_503(
    warehouse: Warehouse,
    make_app: Callable[..., Litestar],
    admin_key: IssuedKey,
    caplog: pytest.LogCaptureFixture,
    down: bool,
    status: int,
    detail: str,
) -> None:
    error = WarehouseError("Code: 210. Connection refused" if down else "Code: 62. Syntax error")
    broken = BrokenWarehouse(warehouse, "price_versions", error, down=down)
    async with admin_client(make_app(broken), admin_key) as client:
        response = await client.get("/v1/catalog/prices")
        ready = await client.get("/readyz")
    assert (response.status_code, response.json()["detail"]) == (status, detail)
    assert ready.status_code == (503 if down else 200)
    logged = [r for r in caplog.records if r.name == "services.api.app"]
    assert [r.levelno for r in logged] == [logging.WARNING if down else logging.ERROR]
