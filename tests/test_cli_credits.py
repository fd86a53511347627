"""`meterline credits ...` on the run's PostgreSQL: grants (idempotent), adjustments,
voids, the balance and the ledger; bad arguments name the field."""

from __future__ import annotations

import json

import pytest

from conftest import run, unique
from meterline.accounts.manage import Accounts


def test_credits_from_the_cli(
    cli_env: None, capsys: pytest.CaptureFixture[str], accounts: Accounts
) -> None:
    account = unique("cli-credits")
    accounts.store.create_account(account)
    grant = ["credits", "grant", account, "25.00", "--idempotency-key", "pay-1"]
    code, out, err = run(capsys, *grant, "--kind", "promotional", "--expires-at", "2099-01-01")
    assert code == 0, err
    made = json.loads(out)
    assert (made["amount_usd"], made["kind"], made["created"]) == ("25", "promotional", True)
    code, out, _ = run(capsys, *grant, "--kind", "promotional", "--expires-at", "2099-01-01")
    assert code == 0 and json.loads(out)["created"] is False  # the same key: posted once

    code, out, err = run(
        capsys,
        "credits",
        "adjust",
        account,
        "-2.50",
        "--reason",
        "sla credit reversed",
        "--idempotency-key",
        "adj-1",
    )
    assert code == 0 and json.loads(out)["amount_usd"] == "-2.5", err
    code, out, _ = run(capsys, "credits", "balance", account)
    assert code == 0
    assert out.splitlines()[0] == (f"account {account}: balance $22.5, available $22.5, owed $0")
    assert made["grant_id"] in out and "2099-01-01" in out

    code, out, _ = run(
        capsys, "credits", "void", account, made["grant_id"], "--idempotency-key", "void-1"
    )
    assert code == 0 and json.loads(out)["amount_usd"] == "-22.5"
    code, out, _ = run(capsys, "credits", "ledger", account)
    kinds = [line.split()[1] for line in out.splitlines()[1:]]
    assert code == 0 and kinds == ["grant", "adjustment", "void"]


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["grant", "{account}", "25.5.5", "--idempotency-key", "k"], 2, "amount_usd"),
        (["grant", "{account}", "-1", "--idempotency-key", "k"], 2, "amount_usd"),
        (
            ["grant", "{account}", "1", "--idempotency-key", "k", "--expires-at", "x"],
            2,
            "expires_at",
        ),
        (["grant", "no-such-account", "1", "--idempotency-key", "k"], 1, "no account"),
        (["adjust", "{account}", "1", "--reason", "", "--idempotency-key", "k"], 2, "reason"),
        (["void", "{account}", "gr_nope", "--idempotency-key", "k"], 1, "no grant"),
        (["balance", "no-such-account"], 1, "no account"),
    ],
)
def test_the_credits_cli_names_what_is_wrong(
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    accounts: Accounts,
    argv: list[str],
    code: int,
    says: str,
) -> None:
    account = unique("cli-credits")
    accounts.store.create_account(account)
    got, _, err = run(capsys, "credits", *(a.format(account=account) for a in argv))
    assert got == code and says in err, err
