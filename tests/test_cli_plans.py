"""`meterline plans ...` on the real PostgreSQL."""

from __future__ import annotations

import json

import pytest

from conftest import run, unique
from meterline.accounts.manage import Accounts


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
