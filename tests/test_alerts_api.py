"""Alerts over HTTP: rules added, listed and removed; the webhook and its signing
secret; the alerts with their deliveries; malformed bodies are 400s naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from conftest import bearer, unique
from meterline.accounts import KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.alerts.controller import AlertBook
from meterline.alerts.model import AlertKind, Channel, webhook_secret
from meterline.alerts.postgres import AlertStore
from meterline.credits.postgres import PostgresLedger
from meterline.lib.metrics import CollectorRegistry
from meterline.lib.postgres import Database
from meterline.lib.warehouse import Warehouse
from meterline.money import usd_to_picos
from meterline.quotas.postgres import PostgresPlanStore
from services.api.app import create_app
from support.quotas import SERVER_SECRET

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
        alerts=AlertBook(AlertStore(database), SERVER_SECRET),
        registry=CollectorRegistry(),
    )
    async with AsyncTestClient(app=app) as test_client:
        yield test_client


@pytest.fixture
def account(accounts: Accounts) -> str:
    made = unique("alerts-api")
    accounts.store.create_account(made)
    return made


async def test_rules_are_added_listed_and_removed(
    client: Client, admin_key: IssuedKey, account: str
) -> None:
    admin = bearer(admin_key)
    rules = f"/v1/accounts/{account}/alerts/rules"
    low = await client.post(
        rules, json={"kind": "balance_below", "threshold_usd": "10"}, headers=admin
    )
    share = await client.post(
        rules, json={"kind": "spend_share", "share_percent": 80}, headers=admin
    )
    assert low.status_code == share.status_code == 201, (low.text, share.text)
    assert (low.json()["threshold_usd"], low.json()["armed"]) == ("10", True)
    assert (share.json()["share_percent"], share.json()["calendar"]) == (80, "month")
    listed = (await client.get(rules, headers=admin)).json()
    assert [r["rule_id"] for r in listed] == [low.json()["rule_id"], share.json()["rule_id"]]
    removed = await client.delete(f"{rules}/{low.json()['rule_id']}", headers=admin)
    assert removed.status_code == 204
    again = await client.delete(f"{rules}/{low.json()['rule_id']}", headers=admin)
    assert again.status_code == 404
    assert len((await client.get(rules, headers=admin)).json()) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "nope"}, "kind"),
        ({"kind": "balance_below"}, "threshold_usd"),  # missing
        ({"kind": "balance_below", "threshold_usd": 5.0}, "threshold_usd"),  # a float
        ({"kind": "balance_below", "threshold_usd": "5", "within_hours": 3}, "within_hours"),
        ({"kind": "credits_expiring", "within_hours": 0}, "within_hours"),
        ({"kind": "spend_share", "share_percent": 0}, "share_percent"),
        ({"kind": "tokens_share", "share_percent": 50, "calendar": "week"}, "calendar"),
        ({"kind": "spend_share", "share_percent": 50, "colour": "red"}, "colour"),
    ],
)
async def test_a_malformed_rule_is_a_400_naming_the_field(
    client: Client, admin_key: IssuedKey, account: str, body: dict[str, Any], field: str
) -> None:
    response = await client.post(
        f"/v1/accounts/{account}/alerts/rules", json=body, headers=bearer(admin_key)
    )
    assert response.status_code == 400, response.text
    assert field in response.text


async def test_the_webhook_has_a_signing_secret_a_new_url_a_new_one(
    client: Client, admin_key: IssuedKey, account: str
) -> None:
    admin = bearer(admin_key)
    hook = f"/v1/accounts/{account}/alerts/webhook"
    first = await client.put(hook, json={"url": "https://gw.example/hooks/a"}, headers=admin)
    same = await client.put(hook, json={"url": "https://gw.example/hooks/a"}, headers=admin)
    moved = await client.put(hook, json={"url": "https://gw.example/hooks/b"}, headers=admin)
    assert first.status_code == 200, first.text
    assert first.json()["signing_secret"] == webhook_secret(SERVER_SECRET, account, 1)
    assert same.json() == first.json()
    assert moved.json()["signing_secret"] == webhook_secret(SERVER_SECRET, account, 2)
    bad = await client.put(hook, json={"url": "ftp://gw.example/"}, headers=admin)
    assert bad.status_code == 400 and "url" in bad.text
    assert (await client.delete(hook, headers=admin)).status_code == 204
    assert (await client.delete(hook, headers=admin)).status_code == 404


async def test_alerts_are_listed_with_their_deliveries(
    client: Client, admin_key: IssuedKey, account: str, database: Database
) -> None:
    store = AlertStore(database)
    rule = store.add_rule(
        account, AlertKind.BALANCE_BELOW, threshold_picos=usd_to_picos(Decimal(1))
    )
    made = store.fire(rule, "k1", {"message": "m"}, channels=[Channel.KAFKA], now=datetime.now(UTC))
    assert made is not None
    page = (await client.get(f"/v1/accounts/{account}/alerts", headers=bearer(admin_key))).json()
    (alert,) = page["alerts"]
    assert (alert["alert_id"], alert["kind"], alert["payload"]["message"]) == (
        made.alert_id,
        "balance_below",
        "m",
    )
    assert [(d["channel"], d["state"], d["attempts"]) for d in alert["deliveries"]] == [
        ("kafka", "pending", [])
    ]
    assert page["next"] is None
    database.rows(  # nobody here sends it: the session's database is shared
        "UPDATE alert_deliveries SET state = 'failed' WHERE alert_id = %(id)s RETURNING 1",
        {"id": made.alert_id},
    )
