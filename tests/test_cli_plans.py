"""`meterline plans ...` on the real PostgreSQL, and `meterline quota` through the HTTP
API over a real QuotaDesk (this machine's Redis, a key prefix per test)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from conftest import run, unique
from meterline.accounts import KeyKind, KeyRing
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.lib.kafka import free_port
from meterline.lib.postgres import Database
from meterline.lib.warehouse import Warehouse
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.plans import Limits, PlanLimits
from meterline.quotas.windows import Window, window_bounds
from support.quotas import account_on, check, priced_model, quota_desk, serving


def test_plans_from_the_cli(
    cli_env: None, capsys: pytest.CaptureFixture[str], accounts: Accounts
) -> None:
    plan_id = unique("cli-plan")
    version = {"plan_id": plan_id, "name": "Pro", "limits": {"spend_per_month_usd": "500.00"}}
    code, out, err = run(capsys, "plans", "create", "--json", json.dumps(version))
    assert code == 0, err
    made = json.loads(out)
    assert (made["version"], made["limits"]["spend_per_month_usd"]) == (1, "500.00")
    code, out, _ = run(
        capsys, "plans", "create", "--json", json.dumps(version | {"price_multiplier": "1.5"})
    )
    assert code == 0 and json.loads(out)["version"] == 2

    code, out, _ = run(capsys, "plans", "list")
    assert code == 0
    [line] = [row for row in out.splitlines() if row.startswith(plan_id)]
    assert line.split()[1:4] == ["2", "postpaid", "1.5"]
    code, out, _ = run(capsys, "plans", "versions", plan_id)
    assert code == 0 and [row.split()[1] for row in out.splitlines()[1:]] == ["1", "2"]

    account_id = unique("cli-acct")
    accounts.store.create_account(account_id)
    code, out, err = run(
        capsys, "plans", "assign", account_id, plan_id, "--version", "1", "--from", "2026-01-01"
    )
    assert code == 0, err
    assigned = json.loads(out)
    assert (assigned["version"], assigned["assigned_by"]) == (1, "cli")
    assert assigned["effective_from"].startswith("2026-01-01T00:00:00")
    code, out, _ = run(capsys, "plans", "show", account_id)
    shown = json.loads(out)
    assert code == 0 and shown["assignment"] == assigned and shown["plan"]["version"] == 1


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["create", "--json", '{"plan_id": "x", "price_multiplier": 1.5}'], 2, "price_multiplier"),
        (["create", "--json", '{"plan_id": "x", "limits": {"rpm": 1}}'], 2, "limits.rpm"),
        (["create", "--json", '{"plan_id": "a b"}'], 2, "plan_id"),
        (["create", "--json", "{"], 2, "not JSON"),
        (["create", "--json", "[]"], 2, "--json"),
        (["versions", "no-such-plan"], 1, "no plan"),
        (["show", "no-such-account"], 1, "no plan assigned"),
        (["assign", "no-such-account", "no-such-plan"], 1, "no plan"),
        (["assign", "acct", "pro", "--from", "whenever"], 2, "effective_from"),
        (["assign", "acct", "pro", "--version", "0"], 2, "version"),
    ],
)
def test_the_cli_names_what_is_wrong(
    cli_env: None, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, says: str
) -> None:
    returned, _, err = run(capsys, "plans", *argv)
    assert (returned, says in err) == (code, True), err


def test_the_cli_refuses_an_unknown_account(
    cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_id = unique("cli-plan")
    assert run(capsys, "plans", "create", "--json", json.dumps({"plan_id": plan_id}))[0] == 0
    code, _, err = run(capsys, "plans", "assign", unique("nobody"), plan_id)
    assert code == 1 and "no account" in err


# -- meterline quota: through the HTTP API, as `meterline up` serves it ------------------


@pytest.fixture
async def quota_api(
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    warehouse: Warehouse,
    database: Database,
    accounts: Accounts,
    key_ring: KeyRing,
    admin_key: IssuedKey,
) -> AsyncIterator[tuple[QuotaDesk, str]]:
    """The API with a desk of its own, found as the CLI finds it: METERLINE_HTTP_PORT, and
    the admin key in <data dir>/keys.json (as `meterline up` writes them); yields the desk
    and a model priced at $1 input, $2 output per million tokens."""
    now = datetime.now(UTC)
    ends = [window_bounds(Window.DAY, now, tz)[1] for tz in ("UTC", "Asia/Tokyo")]
    if (wait := min(ends) - now) < timedelta(seconds=30):  # checks and reads share a day
        await asyncio.sleep(wait.total_seconds() + 0.5)
    model = priced_model(warehouse)
    (tmp_path / "keys.json").write_text(json.dumps({"admin_key": admin_key.secret}))
    async with (
        quota_desk(warehouse, database, accounts) as desk,
        serving(warehouse, key_ring, accounts, desk) as url,
    ):
        monkeypatch.setenv("METERLINE_HTTP_PORT", url.rsplit(":", 1)[1])
        yield desk, model


async def run_quota(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`meterline quota *argv`, off the loop that serves the API."""
    return await asyncio.to_thread(run, capsys, "quota", *argv)


async def test_the_quota_command_prints_the_limits_as_a_table(
    quota_api: tuple[QuotaDesk, str], accounts: Accounts, capsys: pytest.CaptureFixture[str]
) -> None:
    desk, model = quota_api
    limits = PlanLimits(
        requests_per_minute=10,
        spend_per_day_usd=Decimal(1),
        per_api_key=Limits(requests_per_minute=5),
    )
    account = account_on(
        desk,
        accounts,
        timezone="Asia/Tokyo",
        limits=limits,
        price_multiplier=Decimal("1.5"),
        request_fee_usd=Decimal("0.001"),
    )
    for _ in range(2):
        await check(desk, account, model, api_key_id="key-1")

    code, out, err = await run_quota(capsys, account, "--api-key-id", "key-1")
    assert code == 0, err
    heading, columns, *rows = out.splitlines()
    in_force = desk.plans.plan_of(account, datetime.now(UTC))
    assert in_force is not None
    plan = in_force[1].plan_id
    assert heading == f"account {account} (Asia/Tokyo) on plan {plan} version 1; spend in USD"
    assert columns.split() == ["limit", "scope", "used", "cap", "remaining", "resets", "at"]
    tomorrow = datetime.now(ZoneInfo("Asia/Tokyo")).date() + timedelta(days=1)
    # each request: 1,000 × $1 + 500 × $2 per million = $0.002; × 1.5 + $0.001 = $0.004
    assert [row.split() for row in rows] == [
        ["requests_per_minute", "account", "2", "10", "8", "rolling", "60", "s"],
        ["spend_per_day", "account", "0.008", "1", "0.992", f"{tomorrow}T00:00:00+09:00"],
        ["requests_per_minute", "api_key:key-1", "2", "5", "3", "rolling", "60", "s"],
    ]

    code, out, _ = await run_quota(capsys, account)  # the account's own limits only
    assert code == 0 and [row.split()[1] for row in out.splitlines()[2:]] == ["account"] * 2


async def test_the_quota_command_says_when_there_is_no_plan(
    quota_api: tuple[QuotaDesk, str], accounts: Accounts, capsys: pytest.CaptureFixture[str]
) -> None:
    account = unique("planless")
    accounts.store.create_account(account)
    code, out, err = await run_quota(capsys, account)
    assert (code, out) == (0, f"account {account} (UTC) has no plan: no limits\n"), err


async def test_the_quota_command_names_what_is_wrong(
    quota_api: tuple[QuotaDesk, str], accounts: Accounts, capsys: pytest.CaptureFixture[str]
) -> None:
    nobody = unique("nobody")
    code, _, err = await run_quota(capsys, nobody)
    assert (code, err) == (1, f"meterline: no account {nobody!r}\n")

    desk, _ = quota_api
    account = account_on(desk, accounts)
    other = accounts.issue_key(KeyKind.ACCOUNT, account_id=account_on(desk, accounts))
    code, _, err = await run_quota(capsys, account, "--key", other.secret)
    assert code == 1 and "answered 403: this key may not read this account" in err

    code, _, err = await run_quota(capsys, account, "--api", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach the HTTP API" in err


async def test_the_quota_command_fails_clearly_when_redis_is_down(
    cli_env: None,
    warehouse: Warehouse,
    database: Database,
    accounts: Accounts,
    key_ring: KeyRing,
    admin_key: IssuedKey,
    capsys: pytest.CaptureFixture[str],
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    async with (
        quota_desk(warehouse, database, accounts, nowhere) as desk,
        serving(warehouse, key_ring, accounts, desk) as url,
    ):
        account = account_on(desk, accounts, limits=PlanLimits(requests_per_minute=5))
        code, _, err = await run_quota(capsys, account, "--api", url, "--key", admin_key.secret)
    assert code == 1, err
    assert err.startswith(f"meterline: the HTTP API at {url} answered 503: Redis did not answer")
