"""`meterline accounts ...` and `meterline keys ...` on the real PostgreSQL, and auth off."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient
from pydantic import SecretStr

from conftest import TEST_SECRET, run, unique
from meterline.accounts import AccountStatus, KeyRing, OpenDoor, Unauthenticated
from meterline.lib.postgres import Database
from meterline.lib.settings import KeySettings, PostgresSettings, Settings
from meterline.lib.warehouse import Warehouse
from services.api.app import create_app
from services.up import access


def test_accounts_from_the_cli(
    cli_env: None, capsys: pytest.CaptureFixture[str], key_ring: KeyRing
) -> None:
    account_id = unique("cli")
    code, out, _ = run(
        capsys, "accounts", "create", account_id, "--name", "Acme", "--timezone", "Asia/Tokyo"
    )
    assert code == 0, out
    made = json.loads(out)
    assert (made["account_id"], made["timezone"], made["registered_by"]) == (
        account_id,
        "Asia/Tokyo",
        "cli",
    )
    assert run(capsys, "accounts", "create", account_id)[0] == 2  # exists already
    code, _, err = run(capsys, "accounts", "create", unique("tz"), "--timezone", "Mars/Olympus")
    assert code == 2 and "IANA" in err
    code, out, _ = run(capsys, "accounts", "suspend", account_id)
    assert code == 0 and json.loads(out)["status"] == AccountStatus.SUSPENDED
    code, out, _ = run(capsys, "accounts", "list", "--after", account_id[:-1], "--limit", "1000")
    assert code == 0 and account_id in out and "suspended" in out
    code, _, err = run(capsys, "accounts", "show", unique("nobody"))
    assert code == 1 and "no account" in err


def test_keys_from_the_cli_are_shown_once_and_revoked(
    cli_env: None, capsys: pytest.CaptureFixture[str], key_ring: KeyRing
) -> None:
    code, out, err = run(capsys, "keys", "create", "--kind", "service", "--scope", "acme")
    assert code == 0 and "shown this once" in err
    made = json.loads(out)
    secret, key_id = made["key"], made["key_id"]
    assert made["account_ids"] == ["acme"] and made["state"] == "active"
    key_ring.refresh()  # made by another process: this ring learns of it at its refresh
    assert key_ring.authenticate(secret).may_act_for("acme")
    code, out, _ = run(capsys, "keys", "list")
    assert code == 0 and key_id in out and secret not in out
    code, out, _ = run(capsys, "keys", "revoke", key_id)
    assert code == 0 and json.loads(out)["state"] == "revoked"
    key_ring.refresh()
    with pytest.raises(Unauthenticated, match="revoked"):
        key_ring.authenticate(secret)
    code, _, err = run(capsys, "keys", "create", "--kind", "admin", "--scope", "acme")
    assert code == 2 and "no account_ids" in err


def test_the_cli_refuses_another_server_secret(
    cli_env: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    key_ring: KeyRing,
) -> None:
    monkeypatch.setenv("METERLINE_KEYS_SECRET", "not-the-secret-the-keys-were-made-with")
    code, _, err = run(capsys, "keys", "create", "--kind", "admin")
    assert code == 1 and "METERLINE_KEYS_SECRET" in err


def test_the_cli_says_when_postgresql_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from meterline.lib.kafka import free_port

    monkeypatch.setenv("METERLINE_POSTGRES_EMBEDDED_PORT", str(free_port()))
    monkeypatch.setenv("METERLINE_POSTGRES_CONNECT_TIMEOUT_S", "1")
    monkeypatch.setenv("METERLINE_DATA_DIR", str(tmp_path))
    code, _, err = run(capsys, "accounts", "list")
    assert code == 1 and "is `meterline up` running?" in err


def test_auth_is_on_unless_turned_off() -> None:
    assert Settings().auth == "on"


async def test_auth_off_answers_without_a_key_and_says_so(
    database: Database,
    warehouse: Warehouse,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    key_ring: KeyRing,
) -> None:
    settings = Settings(
        auth="off",
        data_dir=tmp_path,
        postgres=PostgresSettings(url=database.url),
        keys=KeySettings(secret=SecretStr(TEST_SECRET.decode())),
    )
    with caplog.at_level(logging.WARNING):
        async with access(settings, database) as granted:
            assert isinstance(granted.auth, OpenDoor)
            app = create_app(warehouse, auth=granted.auth, accounts=granted.accounts)
            async with AsyncTestClient(app=app) as client:
                answer = await client.get("/v1/accounts", params={"limit": 1})
    assert answer.status_code == 200, answer.text
    assert "METERLINE_AUTH=off" in caplog.text
