"""The plans routes end to end, on the real PostgreSQL and chDB."""

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
from meterline.lib.postgres import Database
from meterline.lib.warehouse import Warehouse
from meterline.quotas.postgres import PostgresPlanStore
from services.api.app import create_app

Client = AsyncTestClient[Litestar]


@pytest.fixture
def app(
    warehouse: Warehouse, key_ring: KeyRing, accounts: Accounts, database: Database
) -> Litestar:
    return create_app(
        warehouse, auth=key_ring, accounts=accounts, plans=PostgresPlanStore(database)
    )


@pytest.fixture
async def client(app: Litestar, admin_key: IssuedKey) -> AsyncIterator[Client]:
    """A client presenting the admin key."""
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(bearer(admin_key))
        yield test_client


async def add_plan(client: Client, **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/plans", json={"plan_id": unique("plan")} | fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def new_account(client: Client) -> str:
    account_id = unique("acct")
    response = await client.post("/v1/accounts", json={"account_id": account_id})
    assert response.status_code == 201, response.text
    return account_id


async def test_a_plan_is_versioned_assigned_and_read(client: Client, admin_key: IssuedKey) -> None:
    limits = {"requests_per_minute": 600, "spend_per_month_usd": "500.00"}
    first = await add_plan(
        client, name="Pro", limits=limits, price_multiplier="1.250", request_fee_usd="0.001"
    )
    plan_id = first["plan_id"]
    assert first["version"] == 1 and first["created_at"]
    assert (first["price_multiplier"], first["request_fee_usd"]) == ("1.25", "0.001")
    assert first["limits"]["spend_per_month_usd"] == "500.00"  # money stays a string
    assert first["limits"]["requests_per_minute"] == 600 and first["billing"] == "postpaid"
    second = await add_plan(client, plan_id=plan_id, limits={"requests_per_minute": 1200})
    assert second["version"] == 2 and second["limits"]["spend_per_month_usd"] is None

    listed = (await client.get("/v1/plans")).json()
    assert [p["version"] for p in listed if p["plan_id"] == plan_id] == [2]
    versions = (await client.get(f"/v1/plans/{plan_id}/versions")).json()
    assert [v["version"] for v in versions] == [1, 2] and versions[0] == first

    account_id = await new_account(client)
    path = f"/v1/accounts/{account_id}/plan"
    assigned = await client.post(path, json={"plan_id": plan_id})  # the latest, from now
    assert assigned.status_code == 201, assigned.text
    assert assigned.json() | {"effective_from": None, "assigned_at": None} == {
        "account_id": account_id,
        "plan_id": plan_id,
        "version": 2,
        "effective_from": None,
        "assigned_at": None,
        "assigned_by": f"api:{admin_key.key.key_id}",
    }
    in_force = (await client.get(path)).json()
    assert in_force["assignment"] == assigned.json() and in_force["plan"] == second

    # a change scheduled for next month: now is still version 2, then version 1
    later = (datetime.now(UTC) + timedelta(days=31)).replace(microsecond=0)
    scheduled = await client.post(
        path, json={"plan_id": plan_id, "version": 1, "effective_from": later.isoformat()}
    )
    assert scheduled.status_code == 201, scheduled.text
    assert (await client.get(path)).json()["plan"]["version"] == 2
    then = await client.get(path, params={"at": later.isoformat()})
    assert then.json()["plan"] == first


async def test_an_account_key_reads_its_own_plan_only(client: Client, accounts: Accounts) -> None:
    plan = await add_plan(client)
    own, other = await new_account(client), await new_account(client)
    for account_id in (own, other):
        response = await client.post(
            f"/v1/accounts/{account_id}/plan", json={"plan_id": plan["plan_id"]}
        )
        assert response.status_code == 201, response.text
    key = bearer(accounts.issue_key(KeyKind.ACCOUNT, account_id=own))
    mine = await client.get(f"/v1/accounts/{own}/plan", headers=key)
    assert mine.status_code == 200 and mine.json()["plan"] == plan
    theirs = await client.get(f"/v1/accounts/{other}/plan", headers=key)
    assert theirs.status_code == 403, theirs.text
    assigning = await client.post(
        f"/v1/accounts/{own}/plan", json={"plan_id": plan["plan_id"]}, headers=key
    )
    assert assigning.status_code == 403
    assert (await client.get("/v1/plans", headers=key)).status_code == 403


async def test_no_plan_assigned_is_a_404(client: Client) -> None:
    account_id = await new_account(client)
    response = await client.get(f"/v1/accounts/{account_id}/plan")
    assert response.status_code == 404
    assert response.json()["detail"].startswith("no plan assigned")
    before = await client.post(
        f"/v1/accounts/{account_id}/plan",
        json={"plan_id": (await add_plan(client))["plan_id"], "effective_from": "2030-01-01"},
    )
    assert before.status_code == 201
    assert (await client.get(f"/v1/accounts/{account_id}/plan")).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"price_multiplier": 1.25}, "price_multiplier"),  # a float
        ({"request_fee_usd": 0.001}, "request_fee_usd"),
        ({"limits": {"spend_per_month_usd": 500.0}}, "limits.spend_per_month_usd"),
        ({"limits": {"requests_per_hour": 10}}, "limits.requests_per_hour"),  # no such limit
        ({"limits": {"requests_per_minute": -1}}, "limits.requests_per_minute"),
        ({"limits": {"per_api_key": {"max_in_flight": 0}}}, "limits.per_api_key.max_in_flight"),
        ({"limits": {"models_allowed": ["gpt\x00"]}}, "limits"),
        ({"plan_id": "pro plan"}, "plan_id"),
        ({"plan_id": ""}, "plan_id"),
        ({"name": "line\nbreak"}, "name"),
        ({"price_multiplier": "1.0000001"}, "price_multiplier"),
        ({"billing": "weekly"}, "billing"),
        ({"version": 3}, "version"),  # the store numbers versions
        ({"created_at": "2026-01-01T00:00:00Z"}, "created_at"),
    ],
)
async def test_a_bad_plan_is_a_400_naming_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/v1/plans", json={"plan_id": unique("bad")} | body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert field in [p["key"] for p in error["extra"]], error
    assert field in error["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"plan_id": "pro plan"}, "plan_id"),
        ({"version": 0}, "version"),
        ({"version": 2**31}, "version"),
        ({"effective_from": "next tuesday"}, "effective_from"),
        ({"effective_from": 1700000000}, "effective_from"),
        ({"effective_from": "2300-01-01T00:00:00Z"}, "effective_from"),
        ({"until": "2027-01-01T00:00:00Z"}, "until"),
    ],
)
async def test_a_bad_assignment_is_a_400_naming_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    account_id = await new_account(client)
    response = await client.post(f"/v1/accounts/{account_id}/plan", json={"plan_id": "pro"} | body)
    assert response.status_code == 400, response.text
    assert field in [p["key"] for p in response.json()["extra"]]


async def test_missing_plans_and_accounts_are_404s(client: Client) -> None:
    plan_id = (await add_plan(client))["plan_id"]
    account_id = await new_account(client)
    for path, body, detail in [
        (f"/v1/accounts/{account_id}/plan", {"plan_id": unique("none")}, "no plan"),
        (f"/v1/accounts/{account_id}/plan", {"plan_id": plan_id, "version": 2}, "version 2"),
        (f"/v1/accounts/{unique('nobody')}/plan", {"plan_id": plan_id}, "no account"),
    ]:
        response = await client.post(path, json=body)
        assert response.status_code == 404, response.text
        assert detail in response.json()["detail"]
    for path in (f"/v1/plans/{unique('none')}/versions", "/v1/plans/pro%20plan/versions"):
        response = await client.get(path)
        assert response.status_code == 404, response.text
        assert response.json()["detail"].startswith("no plan")
    assert (await client.get(f"/v1/accounts/{'x' * 200}/plan")).status_code == 404


async def test_a_bad_instant_to_read_at_is_a_400(client: Client) -> None:
    account_id = await new_account(client)
    response = await client.get(f"/v1/accounts/{account_id}/plan", params={"at": "soon"})
    assert response.status_code == 400
    assert [p["key"] for p in response.json()["extra"]] == ["at"]


async def test_without_a_plan_store_there_are_no_plan_routes(
    warehouse: Warehouse, key_ring: KeyRing, accounts: Accounts, admin_key: IssuedKey
) -> None:
    app = create_app(warehouse, auth=key_ring, accounts=accounts)
    async with AsyncTestClient(app=app) as client:
        response = await client.get("/v1/plans", headers=bearer(admin_key))
    assert response.status_code == 404
