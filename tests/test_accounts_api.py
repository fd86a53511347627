"""The accounts and keys routes end to end, on the real PostgreSQL and chDB."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from conftest import bearer, unique
from meterline.accounts import KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.accounts.schemas import MAX_METADATA_BYTES, MAX_METADATA_DEPTH
from meterline.lib.postgres import PostgresError
from meterline.lib.warehouse import Warehouse
from meterline.money import usd_to_picos
from meterline.tokens import TokenUsage
from meterline.usage.clickhouse import ClickHouseUsageStore
from meterline.usage.model import PricedEvent
from services.api.app import create_app

Client = AsyncTestClient[Litestar]

#: What a listed key shows: never its secret nor its hash.
KEY_FIELDS = {
    "key_id",
    "kind",
    "name",
    "account_id",
    "account_ids",
    "state",
    "created_at",
    "expires_at",
    "revoked_at",
    "last_used_at",
}


@pytest.fixture
def app(warehouse: Warehouse, key_ring: KeyRing, accounts: Accounts) -> Litestar:
    return create_app(warehouse, auth=key_ring, accounts=accounts)


@pytest.fixture
async def client(app: Litestar, admin_key: IssuedKey) -> AsyncIterator[Client]:
    """A client presenting the admin key."""
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(bearer(admin_key))
        yield test_client


def presenting(key: str) -> dict[str, str]:
    """Headers that present ``key`` instead of the admin key."""
    return {"Authorization": f"Bearer {key}"}


async def create(client: Client, **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/accounts", json={"account_id": unique("acct")} | fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_an_account_is_created_read_changed_suspended_and_reactivated(
    client: Client,
) -> None:
    made = await create(client, name="Acme", timezone="Asia/Tokyo", metadata={"tier": "gold"})
    account_id = made["account_id"]
    assert made | {"created_at": None, "updated_at": None} == {
        "account_id": account_id,
        "name": "Acme",
        "status": "active",
        "timezone": "Asia/Tokyo",
        "currency": "USD",
        "metadata": {"tier": "gold"},
        "registered_by": "api",
        "created_at": None,
        "updated_at": None,
    }
    assert (await client.get(f"/v1/accounts/{account_id}")).json() == made

    url = f"/v1/accounts/{account_id}"
    suspended = (await client.patch(url, json={"status": "suspended", "name": "Acme KK"})).json()
    assert (suspended["status"], suspended["name"], suspended["timezone"]) == (
        "suspended",
        "Acme KK",
        "Asia/Tokyo",
    )
    changed = await client.patch(url, json={"status": "active", "metadata": {"tier": "silver"}})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["status"], changed.json()["metadata"]) == ("active", {"tier": "silver"})
    assert (await client.get(url)).json()["status"] == "active"


async def test_defaults_of_a_new_account(client: Client) -> None:
    made = await create(client)
    assert (made["name"], made["timezone"], made["metadata"]) == ("", "UTC", {})


async def test_an_existing_account_is_a_409(client: Client) -> None:
    made = await create(client, name="first")
    again = await client.post("/v1/accounts", json={"account_id": made["account_id"]})
    assert again.status_code == 409
    assert again.json() == {
        "status_code": 409,
        "detail": f"account {made['account_id']!r} exists already",
    }
    assert (await client.get(f"/v1/accounts/{made['account_id']}")).json()["name"] == "first"


@pytest.mark.parametrize(
    "path", ["/v1/accounts/{}", "/v1/accounts/%00", "/v1/accounts/" + "x" * 200]
)
async def test_a_missing_account_is_a_404(client: Client, path: str) -> None:
    url = path.format(unique("nobody"))
    read = await client.get(url)
    changed = await client.patch(url, json={"name": "x"})
    assert (read.status_code, changed.status_code) == (404, 404), (read.text, changed.text)
    assert read.json()["detail"].startswith("no account ")


def _nested(depth: int) -> dict[str, Any]:
    nested: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        nested = {"a": nested}
    return nested


DEEP_METADATA = _nested(900)  # within the JSON depth the body takes, too deep for metadata


async def test_metadata_may_nest_a_little(client: Client) -> None:
    made = await create(client, metadata=_nested(MAX_METADATA_DEPTH))
    assert made["metadata"] == _nested(MAX_METADATA_DEPTH)
    too_deep = await client.post(
        "/v1/accounts",
        json={"account_id": unique("a"), "metadata": _nested(MAX_METADATA_DEPTH + 1)},
    )
    assert too_deep.status_code == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"account_id": ""}, "account_id"),
        ({"account_id": "   "}, "account_id"),
        ({"account_id": "x" * 129}, "account_id"),
        ({"account_id": "tab\there"}, "account_id"),
        ({"account_id": 12345}, "account_id"),
        ({}, "account_id"),
        ({"account_id": "a", "timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"account_id": "a", "timezone": ""}, "timezone"),
        ({"account_id": "a", "name": "n" * 257}, "name"),
        ({"account_id": "a", "name": "nul\u0000"}, "name"),
        ({"account_id": "a", "metadata": ["a"]}, "metadata"),
        ({"account_id": "a", "metadata": {"k": "v" * MAX_METADATA_BYTES}}, "metadata"),
        ({"account_id": "a", "metadata": {"k": "nul\u0000"}}, "metadata"),
        ({"account_id": "a", "metadata": {"k": [["nul\u0000"]]}}, "metadata"),
        ({"account_id": "a", "metadata": {"nul\u0000": 1}}, "metadata"),
        ({"account_id": "a", "metadata": DEEP_METADATA}, "metadata"),
        ({"account_id": "a", "colour": "blue"}, "colour"),
    ],
    ids=lambda value: str(value)[:40],
)
async def test_a_bad_account_is_a_400_naming_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/v1/accounts", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert f"{field}: " in error["detail"]
    assert field in [p["key"] for p in error["extra"]]


async def test_the_timezone_is_named_in_its_400(client: Client) -> None:
    response = await client.post(
        "/v1/accounts", json={"account_id": "a", "timezone": "Mars/Olympus_Mons"}
    )
    assert response.json()["detail"] == (
        "timezone: timezone 'Mars/Olympus_Mons' is not an IANA timezone name"
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "closed"}, "status"),
        ({"timezone": "Nowhere/Town"}, "timezone"),
        ({"metadata": "gold"}, "metadata"),
        ({"account_id": "renamed"}, "account_id"),
    ],
    ids=lambda value: str(value)[:40],
)
async def test_a_bad_change_is_a_400_naming_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    made = await create(client)
    response = await client.patch(f"/v1/accounts/{made['account_id']}", json=body)
    assert response.status_code == 400, response.text
    assert field in [p["key"] for p in response.json()["extra"]]


async def test_accounts_are_listed_in_pages_that_skip_nothing(client: Client) -> None:
    prefix = unique("page")
    ids = [f"{prefix}-{i:02d}" for i in range(5)]
    for account_id in reversed(ids):
        await create(client, account_id=account_id)
    seen: list[str] = []
    cursor: str | None = f"{prefix}-"  # just before the first of them
    pages = 0
    while cursor is not None:
        page = (await client.get("/v1/accounts", params={"limit": 2, "after": cursor})).json()
        assert set(page) == {"accounts", "next"} and len(page["accounts"]) <= 2
        seen += [a["account_id"] for a in page["accounts"]]
        cursor, pages = page["next"], pages + 1
    assert [s for s in seen if s.startswith(prefix)] == ids
    assert seen == sorted(seen) and pages >= 3
    whole = (await client.get("/v1/accounts", params={"limit": 1000})).json()
    assert set(ids) <= {a["account_id"] for a in whole["accounts"]}


@pytest.mark.parametrize(
    ("params", "name"),
    [({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"after": "\u0007"}, "after")],
    ids=str,
)
async def test_a_bad_page_is_a_400_naming_it(
    client: Client, params: dict[str, Any], name: str
) -> None:
    response = await client.get("/v1/accounts", params=params)
    assert response.status_code == 400, response.text
    assert [(p["key"], p["source"]) for p in response.json()["extra"]] == [(name, "query")]


async def test_a_key_is_shown_once_and_listed_without_secrets(client: Client) -> None:
    account = await create(client)
    expires = datetime.now(UTC) + timedelta(days=30)
    response = await client.post(
        "/v1/keys",
        json={
            "kind": "account",
            "name": "dashboard",
            "account_id": account["account_id"],
            "expires_at": expires.isoformat(),
        },
    )
    assert response.status_code == 201, response.text
    issued = response.json()
    assert set(issued) == KEY_FIELDS | {"key"}
    assert issued["key"].startswith(f"mlk_{issued['key_id']}_")
    assert (issued["kind"], issued["account_id"], issued["state"]) == (
        "account",
        account["account_id"],
        "active",
    )
    assert datetime.fromisoformat(issued["expires_at"]) == expires

    listing = await client.get("/v1/keys")
    assert listing.status_code == 200
    assert issued["key"] not in listing.text
    assert issued["key"].split("_")[-1] not in listing.text
    [listed] = [k for k in listing.json() if k["key_id"] == issued["key_id"]]
    assert set(listed) == KEY_FIELDS
    assert listed == {k: v for k, v in issued.items() if k != "key"}
    assert all(set(k) == KEY_FIELDS for k in listing.json())


async def test_keys_are_listed_by_account(client: Client) -> None:
    account = (await create(client))["account_id"]
    reader = await client.post("/v1/keys", json={"kind": "account", "account_id": account})
    gateway = await client.post("/v1/keys", json={"kind": "service", "account_ids": [account]})
    await client.post("/v1/keys", json={"kind": "service", "name": "every account"})
    listed = (await client.get("/v1/keys", params={"account_id": account})).json()
    assert [k["key_id"] for k in listed] == [reader.json()["key_id"], gateway.json()["key_id"]]
    assert listed[1]["account_ids"] == [account]


async def test_a_key_is_used_and_its_last_use_is_listed(client: Client, key_ring: KeyRing) -> None:
    issued = (await client.post("/v1/keys", json={"kind": "service"})).json()
    assert issued["last_used_at"] is None
    gateway = presenting(issued["key"])
    used = await client.get("/v1/catalog/versions", params={"model": "x"}, headers=gateway)
    assert used.status_code == 200
    key_ring.flush_used()  # each replica writes the times it noted every little while
    [listed] = [k for k in (await client.get("/v1/keys")).json() if k["key_id"] == issued["key_id"]]
    assert listed["last_used_at"] is not None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"kind": "account"}, "an account key needs account_id"),
        ({"kind": "admin", "account_id": "a"}, "a admin key has no account_id"),
        ({"kind": "account", "account_id": "a", "account_ids": ["a"]}, "has no account_ids"),
        ({"kind": "service", "account_ids": []}, "lists at least one account"),
        ({"kind": "service", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at is in the past"),
        ({"kind": "root"}, "kind: "),
        ({"kind": "service", "account_ids": ["ok", ""]}, "account_ids[1]: "),
        ({"kind": "service", "expires_at": "soon"}, "expires_at: "),
        ({"kind": "service", "secret": "mine"}, "secret: "),
    ],
    ids=lambda value: str(value)[:40],
)
async def test_a_key_that_does_not_fit_is_a_400(
    client: Client, body: dict[str, Any], reason: str
) -> None:
    response = await client.post("/v1/keys", json=body)
    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]


async def test_an_account_key_of_an_unknown_account_is_a_400_naming_it(client: Client) -> None:
    nobody = unique("nobody")
    response = await client.post("/v1/keys", json={"kind": "account", "account_id": nobody})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["detail"] == f"account_id: no account {nobody!r}"
    assert [(p["key"], p["source"]) for p in error["extra"]] == [("account_id", "body")]


async def test_a_revoked_key_gets_401_at_once(client: Client) -> None:
    account = (await create(client))["account_id"]
    issued = (await client.post("/v1/keys", json={"kind": "account", "account_id": account})).json()
    holder = presenting(issued["key"])
    assert (await client.get(f"/v1/accounts/{account}", headers=holder)).status_code == 200

    revoked = await client.post(f"/v1/keys/{issued['key_id']}/revoke")
    assert revoked.status_code == 200, revoked.text
    assert (revoked.json()["state"], set(revoked.json())) == ("revoked", KEY_FIELDS)
    again = await client.post(f"/v1/keys/{issued['key_id']}/revoke")
    assert again.json() == revoked.json()  # the first revocation's time is kept

    refused = await client.get(f"/v1/accounts/{account}", headers=holder)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.json() == {
        "status_code": 401,
        "detail": f"API key {issued['key_id']} is revoked",
    }


@pytest.mark.parametrize("key_id", ["nosuchkey123", "%00"])
async def test_revoking_an_unknown_key_is_a_404(client: Client, key_id: str) -> None:
    response = await client.post(f"/v1/keys/{key_id}/revoke")
    assert response.status_code == 404, response.text
    assert response.json()["detail"].startswith("no key ")


async def test_an_account_key_reads_its_own_account_and_usage(
    client: Client, warehouse: Warehouse
) -> None:
    own, other = (await create(client))["account_id"], (await create(client))["account_id"]
    at = datetime(2026, 11, 2, 9, 15, tzinfo=UTC)
    ClickHouseUsageStore(warehouse).insert_priced([priced_event(own, at, "0.25")])
    key = (await client.post("/v1/keys", json={"kind": "account", "account_id": own})).json()
    dashboard = presenting(key["key"])
    window = {"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"}
    usage = await client.get(f"/v1/accounts/{own}/usage", params=window, headers=dashboard)
    assert usage.status_code == 200, usage.text
    assert (usage.json()["totals"]["requests"], usage.json()["totals"]["cost_usd"]) == (1, "0.25")
    assert (await client.get(f"/v1/accounts/{own}", headers=dashboard)).json()["account_id"] == own
    refused = [
        await client.get(f"/v1/accounts/{other}/usage", headers=dashboard),
        await client.get(f"/v1/accounts/{other}", headers=dashboard),
        await client.get("/v1/accounts", headers=dashboard),
        await client.post("/v1/keys", json={"kind": "admin"}, headers=dashboard),
    ]
    assert [r.status_code for r in refused] == [403] * 4


def priced_event(account: str, at: datetime, cost: str) -> PricedEvent:
    return PricedEvent(
        account_id=account,
        event_id=unique("ev"),
        api_key_id="k",
        model="gpt-4.1-mini",
        provider="openai",
        occurred_at=at,
        received_at=at,
        status="ok",
        usage=TokenUsage(input_tokens=100, output_tokens=50),
        latency_ms=0,
        ttft_ms=0,
        price_id="pv_test",
        price_tier="base",
        cost_picos=usd_to_picos(Decimal(cost)),
        provider_usage_json="",
        kafka_partition=0,
        kafka_offset=0,
    )


class DownStore:
    """An accounts store whose PostgreSQL does not answer: every call fails as the
    real pool fails when the server is gone."""

    def __getattr__(self, name: str) -> Any:
        def unreachable(*args: Any, **kwargs: Any) -> Any:
            raise PostgresError("PostgreSQL at 127.0.0.1:5432/meterline does not answer")

        return unreachable


async def test_an_account_store_outage_is_a_503(
    warehouse: Warehouse,
    key_ring: KeyRing,
    admin_key: IssuedKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = Accounts(DownStore(), key_ring.hasher)
    app = create_app(warehouse, auth=key_ring, accounts=down)
    async with AsyncTestClient(app=app) as client:
        client.headers.update(bearer(admin_key))
        answers = [
            await client.get("/v1/accounts"),
            await client.post("/v1/accounts", json={"account_id": "a"}),
            await client.post("/v1/keys", json={"kind": "service"}),
        ]
        # the keys are in memory: the rest of the API keeps answering
        prices = await client.get("/v1/catalog/versions", params={"model": "x"})
    assert [(a.status_code, a.json()) for a in answers] == [
        (503, {"status_code": 503, "detail": "account store unavailable"})
    ] * 3
    assert prices.status_code == 200
    logged = [r for r in caplog.records if r.name == "services.api.app"]
    assert {r.levelno for r in logged} == {logging.WARNING}
