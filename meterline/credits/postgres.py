"""The ledger in PostgreSQL: the SQL of the credits slice, all of it.

Every posting runs in one transaction that first locks the account's row of
``credit_accounts`` (made on its first posting), so an account's postings are
serialized: two top-ups with one idempotency key post once (the second finds the
first's entry), a debit sees every grant committed before it, and the cached
balance, what is owed and each grant's remainder move with the entries that explain
them. Grants that expired are released (an ``expiry`` entry each) before anything
else is posted for the account, so a debit never draws from one.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import psycopg
from psycopg.rows import dict_row

from meterline.accounts.model import AccountNotFound
from meterline.accounts.postgres import require_account
from meterline.credits.model import (
    MAX_GRANT_PICOS,
    Balance,
    CreditState,
    Draw,
    Entry,
    EntryKind,
    Grant,
    GrantKind,
    available,
    burn_key,
    credit_state,
    draw,
)
from meterline.lib.postgres import Database
from meterline.money import picos_to_usd, usd_to_picos

__all__ = ["IdempotencyConflict", "PostgresLedger", "UsageCharge"]

_Cursor = psycopg.Cursor[dict[str, Any]]

_GRANT_COLUMNS = (
    "grant_id, account_id, kind, amount_usd, remaining_usd, priority, effective_at, "
    "expires_at, closed_at, created_at, created_by"
)
_ENTRY_COLUMNS = (
    "entry_id, account_id, kind, amount_usd, effective_at, idempotency_key, grant_id, "
    "reason, created_by, created_at, events, usage_from, usage_to"
)


class IdempotencyConflict(ValueError):
    """An idempotency key was used before for a different request."""


class UsageCharge(NamedTuple):
    """A priced event as a debit holds it."""

    event_id: str
    occurred_at: datetime
    charge_picos: int


def _picos(value: Decimal) -> int:
    return usd_to_picos(value)


def _grant(row: dict[str, Any]) -> Grant:
    return Grant(
        grant_id=row["grant_id"],
        account_id=row["account_id"],
        kind=GrantKind(row["kind"]),
        amount_picos=_picos(row["amount_usd"]),
        remaining_picos=_picos(row["remaining_usd"]),
        priority=row["priority"],
        effective_at=row["effective_at"],
        expires_at=row["expires_at"],
        closed_at=row["closed_at"],
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


def _entry(row: dict[str, Any]) -> Entry:
    return Entry(
        entry_id=row["entry_id"],
        account_id=row["account_id"],
        kind=EntryKind(row["kind"]),
        amount_picos=_picos(row["amount_usd"]),
        effective_at=row["effective_at"],
        idempotency_key=row["idempotency_key"],
        grant_id=row["grant_id"],
        reason=row["reason"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        events=row["events"],
        usage_from=row["usage_from"],
        usage_to=row["usage_to"],
    )


def _check_amount(picos: int, what: str) -> None:
    if not 0 < abs(picos) <= MAX_GRANT_PICOS:
        raise ValueError(f"{what} is between 0 and {MAX_GRANT_PICOS // 10**12:,} USD, not 0")


class PostgresLedger:
    """Grants, debits, adjustments, voids and expiries of accounts' credits."""

    def __init__(self, database: Database) -> None:
        self.database = database

    # -- postings ---------------------------------------------------------------------

    def grant(
        self,
        account_id: str,
        *,
        amount_picos: int,
        kind: GrantKind,
        idempotency_key: str,
        priority: int = 10,
        effective_at: datetime | None = None,
        expires_at: datetime | None = None,
        created_by: str = "",
        now: datetime | None = None,
    ) -> tuple[Grant, bool]:
        """Give the account credits; (the grant, whether this call made it). The same
        idempotency key again returns the grant it made, or raises
        :class:`IdempotencyConflict` if the terms differ."""
        _check_amount(amount_picos, "amount_usd")
        if amount_picos < 0:
            raise ValueError("a grant's amount_usd is positive")
        now = now or datetime.now(UTC)
        effective_at = effective_at or now
        if expires_at is not None and expires_at <= effective_at:
            raise ValueError("expires_at is after effective_at")
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            self._lock(cursor, account_id, now)
            found = self._by_key(cursor, account_id, idempotency_key)
            if found is not None:
                existing = self._grant_of(cursor, found)
                terms = (existing.amount_picos, existing.kind, existing.priority)
                if terms != (amount_picos, kind, priority) or existing.expires_at != expires_at:
                    raise IdempotencyConflict(
                        f"idempotency_key {idempotency_key!r} made grant "
                        f"{existing.grant_id} with other terms"
                    )
                return existing, False
            made = self._new_grant(
                cursor,
                account_id,
                kind=kind,
                amount_picos=amount_picos,
                priority=priority,
                effective_at=effective_at,
                expires_at=expires_at,
                created_by=created_by,
            )
            self._post(
                cursor,
                account_id,
                EntryKind.GRANT,
                amount_picos,
                effective_at,
                idempotency_key,
                grant_id=made.grant_id,
                created_by=created_by,
            )
            self._pay_owed(cursor, account_id, now)
            return self._grant_by_id(cursor, made.grant_id), True

    def adjust(
        self,
        account_id: str,
        *,
        amount_picos: int,
        reason: str,
        idempotency_key: str,
        created_by: str = "",
        now: datetime | None = None,
    ) -> tuple[Entry, bool]:
        """A correction: a credit (``amount_picos`` > 0, spent as a promotional grant of
        priority 10 that never expires) or a debit drawn in burn order. (The entry,
        whether this call posted it.)"""
        _check_amount(amount_picos, "amount_usd")
        if not reason.strip():
            raise ValueError("an adjustment says its reason")
        now = now or datetime.now(UTC)
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            self._lock(cursor, account_id, now)
            found = self._by_key(cursor, account_id, idempotency_key)
            if found is not None:
                if found.amount_picos != amount_picos or found.kind is not EntryKind.ADJUSTMENT:
                    raise IdempotencyConflict(
                        f"idempotency_key {idempotency_key!r} posted entry {found.entry_id} "
                        "with another amount"
                    )
                return found, False
            grant_id = None
            if amount_picos > 0:
                grant_id = self._new_grant(
                    cursor,
                    account_id,
                    kind=GrantKind.PROMOTIONAL,
                    amount_picos=amount_picos,
                    priority=10,
                    effective_at=now,
                    expires_at=None,
                    created_by=created_by,
                ).grant_id
            entry = self._post(
                cursor,
                account_id,
                EntryKind.ADJUSTMENT,
                amount_picos,
                now,
                idempotency_key,
                grant_id=grant_id,
                reason=reason,
                created_by=created_by,
            )
            if amount_picos < 0:
                self._draw_for(cursor, entry, -amount_picos, now)
            else:
                self._pay_owed(cursor, account_id, now)
            return entry, True

    def void(
        self,
        account_id: str,
        grant_id: str,
        *,
        idempotency_key: str,
        reason: str = "",
        created_by: str = "",
        now: datetime | None = None,
    ) -> tuple[Entry, bool]:
        """Release what is left of a grant; (the entry, whether this call posted it)."""
        now = now or datetime.now(UTC)
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            self._lock(cursor, account_id, now)
            found = self._by_key(cursor, account_id, idempotency_key)
            if found is not None:
                if found.kind is not EntryKind.VOID or found.grant_id != grant_id:
                    raise IdempotencyConflict(
                        f"idempotency_key {idempotency_key!r} posted entry {found.entry_id}"
                    )
                return found, False
            grant = self._grant_by_id(cursor, grant_id)
            if grant.account_id != account_id:
                raise AccountNotFound(f"no grant {grant_id!r} of account {account_id!r}")
            if grant.closed_at is not None:
                raise ValueError(f"grant {grant_id} was closed at {grant.closed_at.isoformat()}")
            entry = self._post(
                cursor,
                account_id,
                EntryKind.VOID,
                -grant.remaining_picos,
                now,
                idempotency_key,
                grant_id=grant_id,
                reason=reason,
                created_by=created_by,
            )
            self._close(cursor, grant, now)
            return entry, True

    def post_usage(
        self, account_id: str, charges: Sequence[UsageCharge], *, now: datetime | None = None
    ) -> Entry | None:
        """One debit for the priced events of ``charges`` not debited before (a replayed
        batch posts only what it has new); None when there is none."""
        now = now or datetime.now(UTC)
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            self._lock(cursor, account_id, now)
            ids = [c.event_id for c in charges]
            done = {
                row["event_id"]
                for row in cursor.execute(
                    "SELECT event_id FROM debited_events "
                    "WHERE account_id = %s AND event_id = ANY(%s)",
                    (account_id, ids),
                )
            }
            new = {c.event_id: c for c in charges if c.event_id not in done}
            if not new:
                return None
            fresh = list(new.values())
            total = sum(c.charge_picos for c in fresh)
            digest = hashlib.sha256("\0".join(sorted(new)).encode()).hexdigest()[:40]
            entry = self._post(
                cursor,
                account_id,
                EntryKind.DEBIT,
                -total,
                now,
                f"usage:{digest}",
                events=len(fresh),
                usage_from=min(c.occurred_at for c in fresh),
                usage_to=max(c.occurred_at for c in fresh),
            )
            cursor.execute(
                """INSERT INTO debited_events (account_id, event_id, occurred_at, charge_usd,
                                               entry_id)
                SELECT %s, e, o, c, %s FROM unnest(%s::text[], %s::timestamptz[],
                                                   %s::numeric[]) AS t (e, o, c)""",
                (
                    account_id,
                    entry.entry_id,
                    [c.event_id for c in fresh],
                    [c.occurred_at for c in fresh],
                    [picos_to_usd(c.charge_picos) for c in fresh],
                ),
            )
            if total:
                self._draw_for(cursor, entry, total, now)
            return entry

    def expire_due(self, *, now: datetime | None = None) -> int:
        """Release what is left of every grant that has expired; returns how many."""
        now = now or datetime.now(UTC)
        due = self.database.rows(
            "SELECT DISTINCT account_id FROM credit_grants "
            "WHERE closed_at IS NULL AND expires_at <= %(now)s",
            {"now": now},
        )
        released = 0
        for row in due:
            with self.database.transaction() as connection:
                cursor = connection.cursor(row_factory=dict_row)
                released += self._lock(cursor, row["account_id"], now)
        return released

    # -- reads ------------------------------------------------------------------------

    def require(self, account_id: str) -> None:
        """Raises AccountNotFound for an account that does not exist."""
        require_account(self.database, account_id)

    def balance(self, account_id: str, *, now: datetime | None = None) -> Balance:
        """The account's balance, what it may spend now, what it owes, its open grants."""
        now = now or datetime.now(UTC)
        self.require(account_id)
        balance, owed, _, grants = self._read(account_id)
        # grants expired since the last posting are not spendable, though not yet released
        return Balance(
            account_id,
            balance_picos=balance
            - sum(g.remaining_picos for g in grants if g.expires_at and g.expires_at <= now),
            available_picos=available(grants, owed, now),
            owed_picos=owed,
            grants=sorted((g for g in grants if g.remaining_picos), key=burn_key),
        )

    def credit(self, account_id: str, *, now: datetime | None = None) -> CreditState:
        """What the account may spend now, with the version of the postings it holds; an
        account never posted to (or none at all) has nothing, at version 0."""
        now = now or datetime.now(UTC)
        _, owed, version, grants = self._read(account_id)
        return credit_state(account_id, grants, owed, version, now)

    def _read(self, account_id: str) -> tuple[int, int, int, list[Grant]]:
        """(balance, owed, version, open grants), all of one snapshot."""
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = cursor.execute(
                "SELECT balance_usd, owed_usd, version FROM credit_accounts WHERE account_id = %s",
                (account_id,),
            ).fetchone()
            grants = self._open_grants(cursor, account_id)
        if row is None:
            return 0, 0, 0, grants
        return _picos(row["balance_usd"]), _picos(row["owed_usd"]), row["version"], grants

    def entries(
        self,
        account_id: str,
        *,
        after: int | None = None,
        limit: int = 100,
        kinds: Collection[EntryKind] = (),
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[Entry]:
        """The account's entries in posting order, after entry ``after``."""
        self.require(account_id)
        rows = self.database.rows(
            f"""SELECT {_ENTRY_COLUMNS} FROM ledger_entries
            WHERE account_id = %(account)s AND entry_id > %(after)s
              AND (cardinality(%(kinds)s::text[]) = 0 OR kind = ANY(%(kinds)s))
              AND (%(start)s::timestamptz IS NULL OR effective_at >= %(start)s)
              AND (%(end)s::timestamptz IS NULL OR effective_at < %(end)s)
            ORDER BY entry_id LIMIT %(limit)s""",
            {
                "account": account_id,
                "after": after or 0,
                "kinds": [k.value for k in kinds],
                "start": start,
                "end": end,
                "limit": limit,
            },
        )
        return [_entry(row) for row in rows]

    def draws(self, entry_id: int) -> list[Draw]:
        """The grants an entry drew from, and how much from each."""
        rows = self.database.rows(
            "SELECT grant_id, amount_usd FROM ledger_draws WHERE entry_id = %(entry)s "
            "ORDER BY drawn_at, grant_id",
            {"entry": entry_id},
        )
        return [Draw(row["grant_id"], _picos(row["amount_usd"])) for row in rows]

    def drawn_from(self, grant_id: str) -> int:
        """How much was drawn from a grant, by debits and adjustments."""
        (row,) = self.database.rows(
            "SELECT coalesce(sum(amount_usd), 0) AS drawn FROM ledger_draws "
            "WHERE grant_id = %(grant)s",
            {"grant": grant_id},
        )
        return _picos(row["drawn"])

    def debited(self, account_id: str, start: datetime, end: datetime) -> dict[str, int]:
        """The events debited whose usage occurred in [start, end): id -> charge."""
        rows = self.database.rows(
            "SELECT event_id, charge_usd FROM debited_events WHERE account_id = %(account)s "
            "AND occurred_at >= %(start)s AND occurred_at < %(end)s",
            {"account": account_id, "start": start, "end": end},
        )
        return {row["event_id"]: _picos(row["charge_usd"]) for row in rows}

    # -- inside a posting ---------------------------------------------------------------

    def _lock(self, cursor: _Cursor, account_id: str, now: datetime) -> int:
        """Lock the account's row (made on its first posting) and release what expired;
        returns how many grants expired."""
        try:
            cursor.execute(
                "INSERT INTO credit_accounts (account_id) VALUES (%s) ON CONFLICT DO NOTHING",
                (account_id,),
            )
        except psycopg.errors.ForeignKeyViolation:
            raise AccountNotFound(f"no account {account_id!r}") from None
        # the update takes the row's lock; a new version marks every posting
        cursor.execute(
            "UPDATE credit_accounts SET version = version + 1 WHERE account_id = %s",
            (account_id,),
        )
        expired = [
            g
            for g in self._open_grants(cursor, account_id)
            if g.expires_at is not None and g.expires_at <= now
        ]
        for grant in expired:
            if grant.remaining_picos:
                self._post(
                    cursor,
                    account_id,
                    EntryKind.EXPIRY,
                    -grant.remaining_picos,
                    grant.expires_at or now,
                    f"expiry:{grant.grant_id}",
                    grant_id=grant.grant_id,
                )
            self._close(cursor, grant, grant.expires_at or now)
        return len(expired)

    def _by_key(self, cursor: _Cursor, account_id: str, key: str) -> Entry | None:
        row = cursor.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM ledger_entries "
            "WHERE account_id = %s AND idempotency_key = %s",
            (account_id, key),
        ).fetchone()
        return None if row is None else _entry(row)

    def _grant_of(self, cursor: _Cursor, entry: Entry) -> Grant:
        if entry.kind is not EntryKind.GRANT or entry.grant_id is None:
            raise IdempotencyConflict(
                f"idempotency_key {entry.idempotency_key!r} posted a {entry.kind.value}"
            )
        return self._grant_by_id(cursor, entry.grant_id)

    def _grant_by_id(self, cursor: _Cursor, grant_id: str) -> Grant:
        row = cursor.execute(
            f"SELECT {_GRANT_COLUMNS} FROM credit_grants WHERE grant_id = %s", (grant_id,)
        ).fetchone()
        if row is None:
            raise AccountNotFound(f"no grant {grant_id!r}")
        return _grant(row)

    def _open_grants(self, cursor: _Cursor, account_id: str) -> list[Grant]:
        rows = cursor.execute(
            f"SELECT {_GRANT_COLUMNS} FROM credit_grants "
            "WHERE account_id = %s AND closed_at IS NULL",
            (account_id,),
        ).fetchall()
        return [_grant(row) for row in rows]

    def _new_grant(
        self,
        cursor: _Cursor,
        account_id: str,
        *,
        kind: GrantKind,
        amount_picos: int,
        priority: int,
        effective_at: datetime,
        expires_at: datetime | None,
        created_by: str,
    ) -> Grant:
        row = cursor.execute(
            f"""INSERT INTO credit_grants (grant_id, account_id, kind, amount_usd, remaining_usd,
                                           priority, effective_at, expires_at, created_by)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_GRANT_COLUMNS}""",
            (
                f"gr_{secrets.token_hex(8)}",
                account_id,
                kind.value,
                picos_to_usd(amount_picos),
                picos_to_usd(amount_picos),
                priority,
                effective_at,
                expires_at,
                created_by,
            ),
        ).fetchone()
        assert row is not None
        return _grant(row)

    def _post(
        self,
        cursor: _Cursor,
        account_id: str,
        kind: EntryKind,
        amount_picos: int,
        effective_at: datetime,
        key: str,
        *,
        grant_id: str | None = None,
        reason: str = "",
        created_by: str = "",
        events: int | None = None,
        usage_from: datetime | None = None,
        usage_to: datetime | None = None,
    ) -> Entry:
        """Append an entry, and move the account's balance by it."""
        row = cursor.execute(
            f"""INSERT INTO ledger_entries (account_id, kind, amount_usd, effective_at,
                    idempotency_key, grant_id, reason, created_by, events, usage_from, usage_to)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_ENTRY_COLUMNS}""",
            (
                account_id,
                kind.value,
                picos_to_usd(amount_picos),
                effective_at,
                key,
                grant_id,
                reason,
                created_by,
                events,
                usage_from,
                usage_to,
            ),
        ).fetchone()
        assert row is not None
        cursor.execute(
            "UPDATE credit_accounts SET balance_usd = balance_usd + %s, updated_at = now() "
            "WHERE account_id = %s",
            (picos_to_usd(amount_picos), account_id),
        )
        return _entry(row)

    def _close(self, cursor: _Cursor, grant: Grant, at: datetime) -> None:
        cursor.execute(
            "UPDATE credit_grants SET remaining_usd = 0, closed_at = %s WHERE grant_id = %s",
            (at, grant.grant_id),
        )

    def _draw_for(self, cursor: _Cursor, entry: Entry, picos: int, now: datetime) -> None:
        """Draw ``picos`` for ``entry`` in burn order; what no grant covers is owed."""
        draws, uncovered = draw(self._open_grants(cursor, entry.account_id), picos, now)
        self._record_draws(cursor, entry.entry_id, draws)
        if uncovered:
            cursor.execute(
                "UPDATE credit_accounts SET owed_usd = owed_usd + %s WHERE account_id = %s",
                (picos_to_usd(uncovered), entry.account_id),
            )

    def _record_draws(self, cursor: _Cursor, entry_id: int, draws: Sequence[Draw]) -> None:
        for d in draws:
            cursor.execute(
                """INSERT INTO ledger_draws (entry_id, grant_id, amount_usd) VALUES (%s, %s, %s)
                ON CONFLICT (entry_id, grant_id)
                DO UPDATE SET amount_usd = ledger_draws.amount_usd + excluded.amount_usd""",
                (entry_id, d.grant_id, picos_to_usd(d.picos)),
            )
            cursor.execute(
                "UPDATE credit_grants SET remaining_usd = remaining_usd - %s WHERE grant_id = %s",
                (picos_to_usd(d.picos), d.grant_id),
            )

    def _pay_owed(self, cursor: _Cursor, account_id: str, now: datetime) -> None:
        """What earlier debits drew beyond the grants is drawn now, oldest debit first."""
        row = cursor.execute(
            "SELECT owed_usd FROM credit_accounts WHERE account_id = %s", (account_id,)
        ).fetchone()
        owed = 0 if row is None else _picos(row["owed_usd"])
        if not owed:
            return
        unpaid = cursor.execute(
            """SELECT e.entry_id,
                      -e.amount_usd - coalesce(sum(d.amount_usd), 0) AS undrawn
            FROM ledger_entries e LEFT JOIN ledger_draws d ON d.entry_id = e.entry_id
            WHERE e.account_id = %s AND e.amount_usd < 0 AND e.kind IN ('debit', 'adjustment')
            GROUP BY e.entry_id
            HAVING -e.amount_usd - coalesce(sum(d.amount_usd), 0) > 0
            ORDER BY e.entry_id""",
            (account_id,),
        ).fetchall()
        paid = 0
        for debit in unpaid:
            draws, uncovered = draw(
                self._open_grants(cursor, account_id), _picos(debit["undrawn"]), now
            )
            self._record_draws(cursor, debit["entry_id"], draws)
            paid += sum(d.picos for d in draws)
            if uncovered:
                break
        if paid:
            cursor.execute(
                "UPDATE credit_accounts SET owed_usd = owed_usd - %s WHERE account_id = %s",
                (picos_to_usd(paid), account_id),
            )
