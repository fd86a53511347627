"""GET /v1/accounts/{account_id}/quota over a real QuotaDesk: this machine's Redis
(127.0.0.1:6379, a key prefix per test, deleted after it), the run's PostgreSQL and the
session's chDB. The API is served as `meterline up` serves it (uvicorn, on the test's
loop): the desk's Redis client belongs to one loop, and Litestar's test client would run
the app on a loop of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from conftest import bearer, unique
from meterline.accounts import KeyKind, KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.lib.kafka import free_port
from meterline.lib.postgres import Database
from meterline.lib.warehouse import Warehouse
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.plans import Limits, PlanLimits
from support.quotas import account_on, check, clear_of_midnight, priced_model, quota_desk, serving

TOKYO = "Asia/Tokyo"
Client = httpx.AsyncClient


@pytest.fixture(autouse=True)
async def one_day() -> None:
    await clear_of_midnight("UTC", TOKYO)


@pytest.fixture
async def model(warehouse: Warehouse) -> str:
    return priced_model(warehouse)


@pytest.fixture
async def desk(
    warehouse: Warehouse, database: Database, accounts: Accounts, model: str
) -> AsyncIterator[QuotaDesk]:
    """The test's desk, made after ``model`` so its catalog has the model's price."""
    async with quota_desk(warehouse, database, accounts) as made:
        yield made


@pytest.fixture
async def client(
    warehouse: Warehouse,
    key_ring: KeyRing,
    accounts: Accounts,
    desk: QuotaDesk,
    admin_key: IssuedKey,
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the served API presenting the admin key."""
    async with (
        serving(warehouse, key_ring, accounts, desk) as url,
        httpx.AsyncClient(base_url=url, headers=bearer(admin_key)) as http,
    ):
        yield http


def limits(body: dict[str, Any]) -> dict[tuple[str, str], tuple[str, str, str]]:
    """(limit, scope) -> (used, cap, remaining)."""
    return {(s["limit"], s["scope"]): (s["used"], s["cap"], s["remaining"]) for s in body["limits"]}


async def test_the_route_shows_what_the_checks_used_and_when_the_day_resets(
    client: Client, desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    account = account_on(
        desk,
        accounts,
        timezone=TOKYO,
        limits=PlanLimits(requests_per_minute=10, spend_per_day_usd=Decimal(1)),
        price_multiplier=Decimal("1.5"),
        request_fee_usd=Decimal("0.001"),
    )
    for _ in range(3):
        await check(desk, account, model)

    response = await client.get(f"/v1/accounts/{account}/quota")
    assert response.status_code == 200, response.text
    body = response.json()
    # each: 1,000 × $1 + 500 × $2 per million = $0.002; × 1.5 + $0.001 fee = $0.004
    tokyo = ZoneInfo(TOKYO)
    tomorrow = datetime.now(tokyo).date() + timedelta(days=1)
    midnight = datetime.combine(tomorrow, time(), tzinfo=tokyo).astimezone(UTC)
    assert body == {
        "account_id": account,
        "timezone": TOKYO,
        "suspended": False,
        "plan_id": body["plan_id"],
        "plan_version": 1,
        "limits": [
            {
                "limit": "requests_per_minute",
                "scope": "account",
                "used": "3",
                "cap": "10",
                "remaining": "7",
                "resets_at": None,
            },
            {
                "limit": "spend_per_day",
                "scope": "account",
                "used": "0.012",
                "cap": "1",
                "remaining": "0.988",
                "resets_at": midnight.isoformat(),
            },
        ],
    }
    assert body["plan_id"].startswith("plan-")
    assert midnight.isoformat().endswith("T15:00:00+00:00")  # Tokyo's midnight, in UTC

    # reading reserves nothing: the same numbers again
    assert (await client.get(f"/v1/accounts/{account}/quota")).json() == body


async def test_an_unknown_account_is_a_404(client: Client) -> None:
    nobody = unique("nobody")
    response = await client.get(f"/v1/accounts/{nobody}/quota")
    assert response.status_code == 404, response.text
    assert response.json() == {"status_code": 404, "detail": f"no account {nobody!r}"}


async def test_an_account_key_reads_its_own_quota_only(
    client: Client, desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    own = account_on(desk, accounts, limits=PlanLimits(requests_per_minute=5))
    other = account_on(desk, accounts, limits=PlanLimits(requests_per_minute=5))
    await check(desk, own, model)
    key = bearer(accounts.issue_key(KeyKind.ACCOUNT, account_id=own))

    mine = await client.get(f"/v1/accounts/{own}/quota", headers=key)
    assert mine.status_code == 200, mine.text
    assert limits(mine.json()) == {("requests_per_minute", "account"): ("1", "5", "4")}
    theirs = await client.get(f"/v1/accounts/{other}/quota", headers=key)
    assert theirs.status_code == 403, theirs.text
    absent = await client.get(f"/v1/accounts/{unique('nobody')}/quota", headers=key)
    assert absent.status_code == 403 and absent.content == theirs.content


async def test_api_key_and_model_parameters_add_their_scopes(
    client: Client, desk: QuotaDesk, accounts: Accounts, model: str
) -> None:
    pattern = f"{model[:-4]}*"  # the model's name with its last characters as a wildcard
    account = account_on(
        desk,
        accounts,
        limits=PlanLimits(
            requests_per_minute=10,
            per_api_key=Limits(requests_per_minute=5),
            per_model={pattern: Limits(requests_per_minute=2)},
        ),
    )
    for _ in range(2):
        await check(desk, account, model, api_key_id="key-1")
    path = f"/v1/accounts/{account}/quota"
    rpm = "requests_per_minute"

    async def read(**params: str) -> dict[tuple[str, str], tuple[str, str, str]]:
        response = await client.get(path, params=params)
        assert response.status_code == 200, response.text
        return limits(response.json())

    assert await read() == {(rpm, "account"): ("2", "10", "8")}
    assert await read(api_key_id="key-1") == {
        (rpm, "account"): ("2", "10", "8"),
        (rpm, "api_key:key-1"): ("2", "5", "3"),
    }
    assert await read(api_key_id="key-2") == {
        (rpm, "account"): ("2", "10", "8"),
        (rpm, "api_key:key-2"): ("0", "5", "5"),
    }
    assert await read(model=model, api_key_id="key-1") == {
        (rpm, "account"): ("2", "10", "8"),
        (rpm, "api_key:key-1"): ("2", "5", "3"),
        (rpm, f"model:{pattern}"): ("2", "2", "0"),
    }
    assert await read(model="another-model") == {(rpm, "account"): ("2", "10", "8")}


async def test_an_account_without_a_plan_has_no_limits(client: Client, accounts: Accounts) -> None:
    account = unique("planless")
    accounts.store.create_account(account)
    response = await client.get(f"/v1/accounts/{account}/quota")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "account_id": account,
        "timezone": "UTC",
        "suspended": False,
        "plan_id": None,
        "plan_version": None,
        "limits": [],
    }


async def test_redis_down_is_a_503(
    warehouse: Warehouse,
    database: Database,
    key_ring: KeyRing,
    accounts: Accounts,
    desk: QuotaDesk,
    admin_key: IssuedKey,
) -> None:
    account = account_on(desk, accounts, limits=PlanLimits(requests_per_minute=5))
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # no one listens: Redis is down
    async with (
        quota_desk(warehouse, database, accounts, nowhere) as lost,
        serving(warehouse, key_ring, accounts, lost) as url,
        httpx.AsyncClient(base_url=url, headers=bearer(admin_key)) as http,
    ):
        response = await http.get(f"/v1/accounts/{account}/quota")
    assert response.status_code == 503, response.text
    assert response.json()["detail"].startswith("Redis did not answer")
