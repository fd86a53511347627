"""Accounts and keys in PostgreSQL: the SQL of the accounts slice, all of it."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from meterline.accounts.model import (
    Account,
    AccountExists,
    AccountNotFound,
    AccountStatus,
    ApiKey,
    KeyKind,
    KeyNotFound,
)
from meterline.accounts.store import AccountUpdate, StoredKey
from meterline.lib.postgres import Database

__all__ = ["PostgresAccountStore", "require_account"]

_ACCOUNT_COLUMNS = (
    "account_id, name, status, timezone, currency, metadata, registered_by, created_at, updated_at"
)
_KEY_COLUMNS = (
    "key_id, kind, name, account_id, account_ids, created_at, expires_at, revoked_at, "
    "last_used_at, secret_hash"
)
#: Takes the ring's next generation; the row lock orders key changes by generation.
_NEXT_GENERATION = "UPDATE key_ring SET generation = generation + 1 RETURNING generation"


def _account(row: dict[str, Any]) -> Account:
    return Account(
        account_id=row["account_id"],
        name=row["name"],
        status=AccountStatus(row["status"]),
        timezone=row["timezone"],
        currency=row["currency"],
        metadata=row["metadata"],
        registered_by=row["registered_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _stored_key(row: dict[str, Any]) -> StoredKey:
    scope = row["account_ids"]
    key = ApiKey(
        key_id=row["key_id"],
        kind=KeyKind(row["kind"]),
        name=row["name"],
        account_id=row["account_id"],
        account_ids=None if scope is None else frozenset(scope),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
    )
    return StoredKey(key, bytes(row["secret_hash"]))


class PostgresAccountStore:
    """:class:`~meterline.accounts.store.AccountStore` on a migrated :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self.database = database

    # accounts

    def create_account(
        self,
        account_id: str,
        *,
        name: str = "",
        timezone: str = "UTC",
        metadata: Mapping[str, Any] | None = None,
        registered_by: str = "api",
    ) -> Account:
        rows = self.database.rows(
            f"""INSERT INTO accounts (account_id, name, timezone, metadata, registered_by)
            VALUES (%(id)s, %(name)s, %(tz)s, %(meta)s, %(by)s)
            ON CONFLICT (account_id) DO NOTHING RETURNING {_ACCOUNT_COLUMNS}""",
            {
                "id": account_id,
                "name": name,
                "tz": timezone,
                "meta": Jsonb(dict(metadata or {})),
                "by": registered_by,
            },
        )
        if not rows:
            raise AccountExists(f"account {account_id!r} exists already")
        return _account(rows[0])

    def account(self, account_id: str) -> Account:
        rows = self.database.rows(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account_id = %(id)s",
            {"id": account_id},
        )
        if not rows:
            raise AccountNotFound(f"no account {account_id!r}")
        return _account(rows[0])

    def accounts(self, *, after: str | None = None, limit: int = 100) -> list[Account]:
        rows = self.database.rows(
            f"""SELECT {_ACCOUNT_COLUMNS} FROM accounts
            WHERE %(after)s::text IS NULL OR account_id > %(after)s::text
            ORDER BY account_id LIMIT %(limit)s""",
            {"after": after, "limit": limit},
        )
        return [_account(r) for r in rows]

    def update_account(self, account_id: str, change: AccountUpdate) -> Account:
        rows = self.database.rows(
            f"""UPDATE accounts SET
                name = coalesce(%(name)s, name),
                status = coalesce(%(status)s, status),
                timezone = coalesce(%(tz)s, timezone),
                metadata = coalesce(%(meta)s, metadata),
                updated_at = now()
            WHERE account_id = %(id)s RETURNING {_ACCOUNT_COLUMNS}""",
            {
                "id": account_id,
                "name": change.name,
                "status": None if change.status is None else change.status.value,
                "tz": change.timezone,
                "meta": None if change.metadata is None else Jsonb(dict(change.metadata)),
            },
        )
        if not rows:
            raise AccountNotFound(f"no account {account_id!r}")
        return _account(rows[0])

    def register(self, account_ids: Collection[str]) -> list[str]:
        if not account_ids:
            return []
        rows = self.database.rows(
            """INSERT INTO accounts (account_id, registered_by)
            SELECT id, 'first_event' FROM unnest(%(ids)s::text[]) AS id ORDER BY id
            ON CONFLICT (account_id) DO NOTHING RETURNING account_id""",
            {"ids": sorted(account_ids)},
        )
        return [r["account_id"] for r in rows]

    def known(self, account_ids: Collection[str]) -> set[str]:
        rows = self.database.rows(
            "SELECT account_id FROM accounts WHERE account_id = ANY(%(ids)s::text[])",
            {"ids": list(account_ids)},
        )
        return {r["account_id"] for r in rows}

    # keys

    def create_key(
        self,
        key_id: str,
        secret_hash: bytes,
        *,
        kind: KeyKind,
        name: str = "",
        account_id: str | None = None,
        account_ids: Collection[str] | None = None,
        expires_at: datetime | None = None,
    ) -> StoredKey:
        try:
            rows = self.database.rows(
                f"""WITH ring AS ({_NEXT_GENERATION})
                INSERT INTO api_keys (key_id, kind, name, secret_hash, account_id, account_ids,
                                      expires_at, generation)
                SELECT %(key_id)s, %(kind)s, %(name)s, %(hash)s, %(account)s, %(scope)s,
                       %(expires)s, generation FROM ring
                RETURNING {_KEY_COLUMNS}""",
                {
                    "key_id": key_id,
                    "kind": kind.value,
                    "name": name,
                    "hash": secret_hash,
                    "account": account_id,
                    "scope": None if account_ids is None else sorted(account_ids),
                    "expires": expires_at,
                },
            )
        except psycopg.errors.ForeignKeyViolation:
            raise AccountNotFound(f"no account {account_id!r}") from None
        return _stored_key(rows[0])

    def revoke_key(self, key_id: str, at: datetime) -> StoredKey:
        rows = self.database.rows(
            f"""WITH ring AS ({_NEXT_GENERATION})
            UPDATE api_keys SET revoked_at = coalesce(revoked_at, %(at)s),
                                generation = ring.generation
            FROM ring WHERE key_id = %(key_id)s RETURNING {_KEY_COLUMNS}""",
            {"key_id": key_id, "at": at},
        )
        if not rows:
            raise KeyNotFound(f"no key {key_id!r}")
        return _stored_key(rows[0])

    def api_keys(self, *, account_id: str | None = None) -> list[ApiKey]:
        rows = self.database.rows(
            f"""SELECT {_KEY_COLUMNS} FROM api_keys
            WHERE %(account)s::text IS NULL OR account_id = %(account)s::text
                  OR %(account)s::text = ANY(account_ids)
            ORDER BY created_at, key_id""",
            {"account": account_id},
        )
        return [_stored_key(r).key for r in rows]

    def keys_since(self, generation: int) -> tuple[int, list[StoredKey]]:
        with self.database.transaction() as connection:
            # one snapshot for both reads, so the generation covers the rows read
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor = connection.cursor(row_factory=dict_row)
            ring = cursor.execute("SELECT generation FROM key_ring").fetchone()
            rows = cursor.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE generation > %(g)s",
                {"g": generation},
            ).fetchall()
        assert ring is not None  # the migration made the row
        return int(ring["generation"]), [_stored_key(r) for r in rows]

    def touch_keys(self, last_used: Mapping[str, datetime]) -> None:
        if not last_used:
            return
        self.database.rows(
            """UPDATE api_keys k SET last_used_at = greatest(k.last_used_at, u.at)
            FROM unnest(%(ids)s::text[], %(ats)s::timestamptz[]) AS u(key_id, at)
            WHERE k.key_id = u.key_id RETURNING k.key_id""",
            {"ids": list(last_used), "ats": list(last_used.values())},
        )

    def answers(self) -> bool:
        return self.database.answers()

    def check_secret(self, check: bytes) -> bool:
        rows = self.database.rows(
            """UPDATE key_ring SET secret_check = coalesce(secret_check, %(check)s)
            RETURNING secret_check = %(check)s AS same""",
            {"check": check},
        )
        return bool(rows[0]["same"])


def require_account(database: Database, account_id: str) -> None:
    """Raises AccountNotFound for an account that does not exist (a slice's reads of an
    account's rows answer 404 for it, not an empty list)."""
    if not database.rows(
        "SELECT 1 FROM accounts WHERE account_id = %(account)s", {"account": account_id}
    ):
        raise AccountNotFound(f"no account {account_id!r}")
