"""Credits over HTTP: top-ups (idempotent), adjustments, voids, the balance, the ledger's
pages, and the check against the warehouse; malformed bodies are 4xx naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from conftest import bearer, unique
from meterline.accounts import KeyKind, KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.credits.postgres import PostgresLedger
from meterline.lib.metrics import CollectorRegistry
from meterline.lib.postgres import Database
from meterline.lib.warehouse import Warehouse
from meterline.quotas.postgres import PostgresPlanStore
from services.api.app import create_app

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def client(
    warehouse: Warehouse, accounts: Accounts, key_ring: KeyRing, database: Database
) -> AsyncIterator[Client]:
    app = create_app(
        warehouse,
        auth=key_ring,
        accounts=accounts,
        plans=PostgresPlanStore(database),
        ledger=PostgresLedger(database),
        registry=CollectorRegistry(),
    )
    async with AsyncTestClient(app=app) as test_client:
        yield test_client


@pytest.fixture
def account(accounts: Accounts) -> str:
    made = unique("credits-api")
    accounts.store.create_account(made)
    return made


async def top_up(
    client: Client, admin: IssuedKey, account: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    body.setdefault("amount_usd", "25.00")
    body.setdefault("idempotency_key", unique("order"))
    response = await client.post(f"/v1/accounts/{account}/grants", json=body, headers=bearer(admin))
    return response.status_code, response.json()


async def test_a_top_up_posts_once_and_shows_in_the_balance(
    client: Client, admin_key: IssuedKey, account: str
) -> None:
    first = await top_up(client, admin_key, account, idempotency_key="pay_123")
    again = await top_up(client, admin_key, account, idempotency_key="pay_123")
    assert first[0] == 201 and again == (200, first[1])
    assert first[1]["amount_usd"] == first[1]["remaining_usd"] == "25"
    conflict = await top_up(client, admin_key, account, idempotency_key="pay_123", amount_usd="9")
    assert conflict[0] == 409 and "pay_123" in conflict[1]["detail"]

    balance = (
        await client.get(f"/v1/accounts/{account}/balance", headers=bearer(admin_key))
    ).json()
    assert (balance["balance_usd"], balance["available_usd"], balance["owed_usd"]) == (
        "25",
        "25",
        "0",
    )
    assert [g["grant_id"] for g in balance["grants"]] == [first[1]["grant_id"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"amount_usd": 25.0}, "amount_usd"),  # a float
        ({"amount_usd": "-5"}, "amount_usd"),
        ({"amount_usd": "0.0000000000001"}, "amount_usd"),  # beyond the pico-dollar
        ({"kind": "stolen"}, "kind"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"expires_at": "not a time"}, "expires_at"),
        ({"priority": 5000}, "priority"),
    ],
)
async def test_a_malformed_top_up_is_a_400_naming_the_field(
    client: Client, admin_key: IssuedKey, account: str, body: dict[str, Any], field: str
) -> None:
    status, answer = await top_up(client, admin_key, account, **body)
    assert status == 400, answer
    assert field in str(answer)


async def test_adjustments_voids_and_the_ledger_in_pages(
    client: Client, admin_key: IssuedKey, account: str
) -> None:
    admin = bearer(admin_key)
    _, grant = await top_up(client, admin_key, account, amount_usd="10")
    adjust = await client.post(
        f"/v1/accounts/{account}/adjustments",
        json={"amount_usd": "-2.5", "reason": "refund reversed", "idempotency_key": "adj-1"},
        headers=admin,
    )
    assert adjust.status_code == 201 and adjust.json()["reason"] == "refund reversed"
    void = await client.post(
        f"/v1/accounts/{account}/grants/{grant['grant_id']}/void",
        json={"idempotency_key": "void-1", "reason": "chargeback"},
        headers=admin,
    )
    assert void.status_code == 201 and void.json()["amount_usd"] == "-7.5"

    pages, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 2} if after is None else {"limit": 2, "after": after}
        page = await client.get(f"/v1/accounts/{account}/ledger", params=params, headers=admin)
        body = page.json()
        pages.append([(e["kind"], e["amount_usd"]) for e in body["entries"]])
        if (after := body["next"]) is None:
            break
    assert pages == [[("grant", "10"), ("adjustment", "-2.5")], [("void", "-7.5")]]
    only = await client.get(
        f"/v1/accounts/{account}/ledger", params={"kind": "void"}, headers=admin
    )
    assert [e["kind"] for e in only.json()["entries"]] == ["void"]
    balance = (await client.get(f"/v1/accounts/{account}/balance", headers=admin)).json()
    assert balance["balance_usd"] == "0" and balance["grants"] == []


async def test_an_account_key_reads_its_own_balance_only(
    client: Client, accounts: Accounts, admin_key: IssuedKey, account: str
) -> None:
    other = unique("credits-other")
    accounts.store.create_account(other)
    own = accounts.issue_key(KeyKind.ACCOUNT, account_id=account)
    assert (
        await client.get(f"/v1/accounts/{account}/balance", headers=bearer(own))
    ).status_code == 200
    assert (
        await client.get(f"/v1/accounts/{other}/balance", headers=bearer(own))
    ).status_code == 403
    refused = await client.post(
        f"/v1/accounts/{account}/grants",
        json={"amount_usd": "1", "idempotency_key": "self-service"},
        headers=bearer(own),
    )
    assert refused.status_code == 403  # only admins give credits
    missing = await client.get(
        f"/v1/accounts/{unique('nobody')}/balance", headers=bearer(admin_key)
    )
    assert missing.status_code == 404


async def test_the_check_against_the_warehouse_agrees_on_an_empty_period(
    client: Client, admin_key: IssuedKey, account: str
) -> None:
    start = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    response = await client.get(
        f"/v1/accounts/{account}/ledger/check", params={"from": start}, headers=bearer(admin_key)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["agrees"] and (body["ledger_usd"], body["warehouse_usd"]) == ("0", "0")
