"""Accounts and keys on the real PostgreSQL: the store, the key ring, migrations."""

from __future__ import annotations

import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from conftest import TEST_SECRET, unique
from meterline.accounts import (
    AccountExists,
    AccountNotFound,
    AccountStatus,
    AccountUpdate,
    KeyKind,
    KeyNotFound,
    KeyRing,
    Unauthenticated,
)
from meterline.accounts.auth import SecretMismatch
from meterline.accounts.keys import KeyHasher, read_key_id, server_secret
from meterline.accounts.manage import Accounts, first_keys
from meterline.accounts.postgres import PostgresAccountStore
from meterline.lib.postgres import Database, migrate, open_database
from meterline.lib.settings import PostgresSettings


def test_account_lifecycle(accounts: Accounts) -> None:
    store, account_id = accounts.store, unique("acct")
    made = store.create_account(
        account_id, name="Acme", timezone="Asia/Tokyo", metadata={"tier": "gold"}
    )
    assert (made.status, made.timezone, made.currency) == (
        AccountStatus.ACTIVE,
        "Asia/Tokyo",
        "USD",
    )
    assert store.account(account_id) == made
    with pytest.raises(AccountExists):
        store.create_account(account_id)
    suspended = store.update_account(account_id, AccountUpdate(status=AccountStatus.SUSPENDED))
    assert (suspended.status, suspended.name, suspended.metadata) == (
        AccountStatus.SUSPENDED,
        "Acme",
        {"tier": "gold"},
    )
    with pytest.raises(AccountNotFound):
        store.update_account(unique("nobody"), AccountUpdate(name="x"))
    with pytest.raises(AccountNotFound):
        store.account(unique("nobody"))


def test_pages_of_accounts_skip_nothing(accounts: Accounts) -> None:
    prefix = unique("page")
    ids = [f"{prefix}-{i:02d}" for i in range(7)]
    for account_id in reversed(ids):
        accounts.store.create_account(account_id)
    seen: list[str] = []
    after = f"{prefix}-"  # just before the first of them
    while page := [a for a in accounts.store.accounts(after=after, limit=3)]:
        mine = [a.account_id for a in page if a.account_id.startswith(prefix)]
        seen += mine
        if len(mine) < len(page) or len(page) < 3:
            break
        after = page[-1].account_id
    assert seen == ids


def test_first_event_registers_an_account_once(accounts: Accounts) -> None:
    known, new = unique("known"), unique("new")
    accounts.store.create_account(known, name="kept")
    assert accounts.store.register({known, new}) == [new]
    assert accounts.store.register({known, new}) == []
    assert accounts.store.account(new).registered_by == "first_event"
    assert accounts.store.account(known).name == "kept"
    assert accounts.store.known({known, new, unique("other")}) == {known, new}


def test_a_key_authenticates_until_revoked(accounts: Accounts, key_ring: KeyRing) -> None:
    account_id = unique("acct")
    accounts.store.create_account(account_id)
    issued = accounts.issue_key(KeyKind.ACCOUNT, name="dashboard", account_id=account_id)
    assert read_key_id(issued.secret) == issued.key.key_id
    principal = key_ring.authenticate(issued.secret)
    assert principal.may_read(account_id) and not principal.may_read(unique("other"))
    assert not principal.may_act_for(account_id)
    accounts.revoke_key(issued.key.key_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        key_ring.authenticate(issued.secret)


def test_the_stored_hash_is_not_the_key(accounts: Accounts, database: Database) -> None:
    issued = accounts.issue_key(KeyKind.SERVICE, account_ids=["a", "b"])
    with database.transaction() as connection:
        row = connection.execute(
            "SELECT secret_hash, account_ids FROM api_keys WHERE key_id = %s",
            (issued.key.key_id,),
        ).fetchone()
    assert row is not None
    stored_hash, scope = row
    assert isinstance(stored_hash, bytes) and len(stored_hash) == 32
    assert issued.secret.encode() not in stored_hash and scope == ["a", "b"]
    assert stored_hash == KeyHasher(TEST_SECRET).hash(issued.secret)


@pytest.mark.parametrize(
    "presented",
    [None, "", "mlk_", "Bearer x", "mlk_" + "a" * 12 + "_" + "b" * 43],
    ids=["none", "empty", "prefix-only", "garbage", "unknown-id"],
)
def test_what_is_not_a_key_is_refused(key_ring: KeyRing, presented: str | None) -> None:
    with pytest.raises(Unauthenticated):
        key_ring.authenticate(presented)


def test_a_wrong_secret_for_a_known_key_id_is_refused(
    accounts: Accounts, key_ring: KeyRing
) -> None:
    issued = accounts.issue_key(KeyKind.ADMIN)
    forged = issued.secret[:-4] + ("AAAA" if not issued.secret.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated, match="not a valid API key"):
        key_ring.authenticate(forged)


def test_expired_keys_are_refused(accounts: Accounts, key_ring: KeyRing) -> None:
    now = datetime.now(UTC)
    issued = accounts.issue_key(KeyKind.ADMIN, expires_at=now + timedelta(hours=1))
    assert key_ring.authenticate(issued.secret).is_admin
    later = KeyRing(key_ring.store, key_ring.hasher, clock=lambda: now + timedelta(hours=2))
    with pytest.raises(Unauthenticated, match="expired"):
        later.load().authenticate(issued.secret)
    with pytest.raises(ValueError, match="past"):
        accounts.issue_key(KeyKind.ADMIN, expires_at=now - timedelta(seconds=1))


def test_revocation_reaches_another_replica_at_its_next_refresh(
    accounts: Accounts, database: Database
) -> None:
    other = KeyRing(PostgresAccountStore(database), KeyHasher(TEST_SECRET)).load()
    issued = accounts.issue_key(KeyKind.SERVICE, name="gateway")
    with pytest.raises(Unauthenticated):
        other.authenticate(issued.secret)  # made elsewhere, not seen yet
    assert other.refresh() >= 1
    assert other.authenticate(issued.secret).kind is KeyKind.SERVICE
    accounts.revoke_key(issued.key.key_id)
    other.refresh()
    with pytest.raises(Unauthenticated, match="revoked"):
        other.authenticate(issued.secret)
    assert other.refresh() == 0  # nothing changed since: nothing read


def test_refresh_misses_no_change_made_meanwhile(accounts: Accounts, database: Database) -> None:
    """Keys issued by concurrent writers all reach a ring refreshing meanwhile."""
    ring = KeyRing(PostgresAccountStore(database), KeyHasher(TEST_SECRET)).load()
    issued: list[str] = []
    done = threading.Event()

    def issue() -> None:
        for _ in range(25):
            issued.append(accounts.issue_key(KeyKind.ADMIN).secret)

    writers = [threading.Thread(target=issue) for _ in range(3)]
    for writer in writers:
        writer.start()
    while not done.is_set():
        ring.refresh()
        if not any(w.is_alive() for w in writers):
            done.set()
    ring.refresh()
    assert len(issued) == 75
    assert all(ring.authenticate(secret).is_admin for secret in issued)


def test_last_used_is_written_in_one_flush(accounts: Accounts, key_ring: KeyRing) -> None:
    issued = accounts.issue_key(KeyKind.ADMIN)
    for _ in range(100):
        key_ring.authenticate(issued.secret)
    assert key_ring.flush_used() >= 1
    listed = {k.key_id: k for k in accounts.store.api_keys()}
    assert listed[issued.key.key_id].last_used_at is not None
    assert key_ring.flush_used() == 0


def test_revoking_an_unknown_key(accounts: Accounts) -> None:
    with pytest.raises(KeyNotFound):
        accounts.revoke_key("nosuchkey000")


def test_scopes_must_fit_the_kind(accounts: Accounts) -> None:
    with pytest.raises(ValueError, match="needs account_id"):
        accounts.issue_key(KeyKind.ACCOUNT)
    with pytest.raises(ValueError, match="no account_ids"):
        accounts.issue_key(KeyKind.ADMIN, account_ids=["a"])
    with pytest.raises(AccountNotFound):
        accounts.issue_key(KeyKind.ACCOUNT, account_id=unique("nobody"))


def test_another_server_secret_refuses_to_start(database: Database) -> None:
    ring = KeyRing(PostgresAccountStore(database), KeyHasher(b"another-secret-of-32-bytes-000000"))
    with pytest.raises(SecretMismatch, match="METERLINE_KEYS_SECRET"):
        ring.load()


def test_first_keys_once_in_an_owner_only_file(postgres_url: str, tmp_path: Path) -> None:
    schema = f"first_{os.getpid()}_{unique('s').split('-')[1]}"
    with open_database(postgres_url, PostgresSettings(schema_name=schema)) as db:
        ring = KeyRing(PostgresAccountStore(db), KeyHasher(TEST_SECRET)).load()
        manage = Accounts(ring.store, ring.hasher, ring)
        path = tmp_path / "keys.json"
        issued = first_keys(manage, path)
        assert [k.key.kind for k in issued] == [KeyKind.ADMIN, KeyKind.SERVICE]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert issued[0].secret in path.read_text()
        assert ring.authenticate(issued[0].secret).is_admin
        assert first_keys(manage, path) == []  # keys exist: none made, none shown
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_migrations_are_idempotent_and_serialized(postgres_url: str) -> None:
    schema = f"mig_{unique('s').split('-')[1]}"
    results: list[list[str]] = []
    runners = [
        threading.Thread(target=lambda: results.append(migrate(postgres_url, schema)))
        for _ in range(3)
    ]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()
    # one applied them, two found them done
    assert sorted(results, key=len) == [[], [], ["0001", "0002", "0003", "0004"]]
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_the_server_secret_file_is_made_once(tmp_path: Path) -> None:
    first = server_secret("", tmp_path)
    assert server_secret("", tmp_path) == first and len(first) == 64
    assert stat.S_IMODE((tmp_path / "auth-secret").stat().st_mode) == 0o600
    assert server_secret("configured", tmp_path) == b"configured"
