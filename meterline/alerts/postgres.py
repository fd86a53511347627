"""Alerts in PostgreSQL: the SQL of the alerts slice, all of it.

An alert is inserted once per ``(account_id, dedupe_key)`` with a delivery row per
channel (the outbox); senders claim due deliveries with ``FOR UPDATE SKIP LOCKED`` and
a lease, so replicas never send one delivery at once, and a sender killed mid-send is
replaced when its lease ends. Every attempt is recorded.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from meterline.accounts.model import AccountNotFound
from meterline.accounts.postgres import require_account
from meterline.alerts.model import Alert, AlertKind, Attempt, Channel, Delivery, Rule
from meterline.lib.postgres import Database
from meterline.money import picos_to_usd, usd_to_picos

__all__ = ["AlertStore", "Claim", "RuleNotFound"]

_Cursor = psycopg.Cursor[dict[str, Any]]

_RULE_COLUMNS = (
    "rule_id, account_id, kind, threshold_usd, within_s, share_percent, calendar, armed, "
    "crossings, created_at, created_by"
)
#: Rules of one account, at most: a screenful, and each is evaluated per batch.
MAX_RULES_PER_ACCOUNT = 50


class RuleNotFound(LookupError):
    """No such rule on the account (404)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery a sender holds until ``lease_until``: send it, then record the attempt."""

    alert_id: str
    account_id: str
    channel: Channel
    attempts: int
    payload: dict[str, Any]
    #: webhook: where to, and the generation its secret is of (None: no webhook now)
    url: str | None
    generation: int | None


def _rule(row: dict[str, Any]) -> Rule:
    threshold: Decimal | None = row["threshold_usd"]
    return Rule(
        rule_id=row["rule_id"],
        account_id=row["account_id"],
        kind=AlertKind(row["kind"]),
        threshold_picos=None if threshold is None else usd_to_picos(threshold),
        within=None if row["within_s"] is None else timedelta(seconds=row["within_s"]),
        share_percent=row["share_percent"],
        calendar=row["calendar"],
        armed=row["armed"],
        crossings=row["crossings"],
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


class AlertStore:
    """Rules, webhooks, alerts and their deliveries on a migrated :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self.database = database

    # -- rules and webhooks -------------------------------------------------------------

    def add_rule(
        self,
        account_id: str,
        kind: AlertKind,
        *,
        threshold_picos: int | None = None,
        within: timedelta | None = None,
        share_percent: int | None = None,
        calendar: str | None = None,
        created_by: str = "",
    ) -> Rule:
        """A new rule; raises AccountNotFound, or ValueError past
        :data:`MAX_RULES_PER_ACCOUNT`."""
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            self._lock_account(cursor, account_id)
            (count,) = cursor.execute(
                "SELECT count(*) AS n FROM alert_rules WHERE account_id = %s", (account_id,)
            ).fetchall()
            if count["n"] >= MAX_RULES_PER_ACCOUNT:
                raise ValueError(
                    f"the account has {MAX_RULES_PER_ACCOUNT} alert rules, the most it may have"
                )
            row = cursor.execute(
                f"""INSERT INTO alert_rules (rule_id, account_id, kind, threshold_usd, within_s,
                        share_percent, calendar, created_by)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_RULE_COLUMNS}""",
                (
                    f"alr_{secrets.token_hex(8)}",
                    account_id,
                    kind.value,
                    None if threshold_picos is None else picos_to_usd(threshold_picos),
                    None if within is None else int(within.total_seconds()),
                    share_percent,
                    calendar,
                    created_by,
                ),
            ).fetchone()
        assert row is not None
        return _rule(row)

    def _lock_account(self, cursor: _Cursor, account_id: str) -> None:
        found = cursor.execute(
            "SELECT 1 FROM accounts WHERE account_id = %s FOR SHARE", (account_id,)
        ).fetchone()
        if found is None:
            raise AccountNotFound(f"no account {account_id!r}")

    def require(self, account_id: str) -> None:
        """Raises AccountNotFound for an account that does not exist."""
        require_account(self.database, account_id)

    def rules(self, account_ids: Sequence[str]) -> dict[str, list[Rule]]:
        """The rules of those accounts that have any, oldest first."""
        rows = self.database.rows(
            f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE account_id = ANY(%(accounts)s) "
            "ORDER BY created_at, rule_id",
            {"accounts": list(account_ids)},
        )
        found: dict[str, list[Rule]] = {}
        for row in rows:
            found.setdefault(row["account_id"], []).append(_rule(row))
        return found

    def accounts_with_rules(self) -> list[str]:
        rows = self.database.rows("SELECT DISTINCT account_id FROM alert_rules")
        return sorted(row["account_id"] for row in rows)

    def remove_rule(self, account_id: str, rule_id: str) -> None:
        with self.database.transaction() as connection:
            deleted = connection.execute(
                "DELETE FROM alert_rules WHERE account_id = %s AND rule_id = %s",
                (account_id, rule_id),
            ).rowcount
        if not deleted:
            raise RuleNotFound(f"no alert rule {rule_id!r} on the account")

    def set_webhook(self, account_id: str, url: str) -> int:
        """Post the account's alerts to ``url`` from now on; returns the generation of
        its signing secret (a new one each time the URL changes)."""
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            self._lock_account(cursor, account_id)
            row = cursor.execute(
                """INSERT INTO alert_webhooks (account_id, url) VALUES (%s, %s)
                ON CONFLICT (account_id) DO UPDATE SET
                    generation = alert_webhooks.generation
                        + (alert_webhooks.url IS DISTINCT FROM excluded.url)::int,
                    url = excluded.url, updated_at = now()
                RETURNING generation""",
                (account_id, url),
            ).fetchone()
        assert row is not None
        return int(row["generation"])

    def webhook(self, account_id: str) -> tuple[str, int] | None:
        """(url, generation) of the account's webhook; None: it has none."""
        rows = self.database.rows(
            "SELECT url, generation FROM alert_webhooks WHERE account_id = %(account)s",
            {"account": account_id},
        )
        return (rows[0]["url"], rows[0]["generation"]) if rows else None

    def remove_webhook(self, account_id: str) -> bool:
        with self.database.transaction() as connection:
            deleted = connection.execute(
                "DELETE FROM alert_webhooks WHERE account_id = %s", (account_id,)
            ).rowcount
        return bool(deleted)

    # -- firing -------------------------------------------------------------------------

    def fire(
        self,
        rule: Rule,
        dedupe_key: str,
        payload: dict[str, Any],
        *,
        channels: Sequence[Channel],
        now: datetime,
    ) -> Alert | None:
        """The alert of ``dedupe_key``, made now with a delivery per channel; None when
        it was made before (by this evaluator or another)."""
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            return self._insert(cursor, rule, dedupe_key, payload, channels, now)

    def balance_crossing(
        self,
        rule: Rule,
        below: bool,
        payload: dict[str, Any],
        *,
        channels: Sequence[Channel],
        now: datetime,
    ) -> Alert | None:
        """A balance rule seeing the balance ``below`` its threshold or not: fires when
        it is armed and the balance is below (once: it is then disarmed), is armed again
        when the balance is not. Under the rule's row lock, so evaluators agree."""
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            row = cursor.execute(
                "SELECT armed, crossings FROM alert_rules WHERE rule_id = %s FOR UPDATE",
                (rule.rule_id,),
            ).fetchone()
            if row is None:  # removed meanwhile
                return None
            if below and row["armed"]:
                crossing = row["crossings"] + 1
                cursor.execute(
                    "UPDATE alert_rules SET armed = false, crossings = %s WHERE rule_id = %s",
                    (crossing, rule.rule_id),
                )
                key = f"{rule.rule_id}:{crossing}"
                return self._insert(cursor, rule, key, payload, channels, now)
            if not below and not row["armed"]:
                cursor.execute(
                    "UPDATE alert_rules SET armed = true WHERE rule_id = %s", (rule.rule_id,)
                )
            return None

    def _insert(
        self,
        cursor: _Cursor,
        rule: Rule,
        dedupe_key: str,
        payload: dict[str, Any],
        channels: Sequence[Channel],
        now: datetime,
    ) -> Alert | None:
        alert_id = f"alt_{secrets.token_hex(10)}"
        body = {
            "alert_id": alert_id,
            "account_id": rule.account_id,
            "rule_id": rule.rule_id,
            "kind": rule.kind.value,
            "fired_at": now.isoformat(),
            **payload,
        }
        made = cursor.execute(
            """INSERT INTO alerts (alert_id, account_id, rule_id, dedupe_key, kind, fired_at,
                                   payload)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (account_id, dedupe_key) DO NOTHING RETURNING alert_id""",
            (
                alert_id,
                rule.account_id,
                rule.rule_id,
                dedupe_key,
                rule.kind.value,
                now,
                Jsonb(body),
            ),
        ).fetchone()
        if made is None:
            return None
        for channel in channels:
            cursor.execute(
                "INSERT INTO alert_deliveries (alert_id, channel, next_attempt_at) "
                "VALUES (%s, %s, %s)",
                (alert_id, channel.value, now),
            )
        return Alert(alert_id, rule.account_id, rule.rule_id, rule.kind, now, body, [])

    # -- delivering ---------------------------------------------------------------------

    def claim(self, *, limit: int, lease: timedelta, now: datetime | None = None) -> list[Claim]:
        """Up to ``limit`` deliveries due, each held by this caller for ``lease``."""
        now = now or datetime.now(UTC)
        rows = self.database.rows(
            """UPDATE alert_deliveries d SET next_attempt_at = %(until)s
            FROM (SELECT alert_id, channel FROM alert_deliveries
                  WHERE state = 'pending' AND next_attempt_at <= %(now)s
                  ORDER BY next_attempt_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) due,
                 alerts a LEFT JOIN alert_webhooks w ON w.account_id = a.account_id
            WHERE d.alert_id = due.alert_id AND d.channel = due.channel
              AND a.alert_id = d.alert_id
            RETURNING d.alert_id, d.channel, d.attempts, a.account_id, a.payload, w.url,
                      w.generation""",
            {"now": now, "until": now + lease, "limit": limit},
        )
        return [
            Claim(
                alert_id=row["alert_id"],
                account_id=row["account_id"],
                channel=Channel(row["channel"]),
                attempts=row["attempts"],
                payload=row["payload"],
                url=row["url"],
                generation=row["generation"],
            )
            for row in rows
        ]

    def record(
        self,
        claim: Claim,
        *,
        delivered: bool,
        status: int | None,
        error: str,
        retry_at: datetime | None,
        now: datetime | None = None,
    ) -> None:
        """An attempt of ``claim``: delivered, or to be tried at ``retry_at`` (None: no
        more attempts: failed)."""
        now = now or datetime.now(UTC)
        attempt = claim.attempts + 1
        state = "delivered" if delivered else ("pending" if retry_at is not None else "failed")
        with self.database.transaction() as connection:
            connection.execute(
                "INSERT INTO alert_attempts (alert_id, channel, attempt, at, status, error) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (claim.alert_id, claim.channel.value, attempt, now, status, error[:1000]),
            )
            connection.execute(
                """UPDATE alert_deliveries SET attempts = %s, state = %s,
                    next_attempt_at = coalesce(%s, next_attempt_at),
                    delivered_at = CASE WHEN %s THEN %s::timestamptz END
                WHERE alert_id = %s AND channel = %s AND attempts = %s""",
                (
                    attempt,
                    state,
                    retry_at,
                    delivered,
                    now,
                    claim.alert_id,
                    claim.channel.value,
                    claim.attempts,
                ),
            )

    # -- reads --------------------------------------------------------------------------

    def alerts(self, account_id: str, *, before: str | None = None, limit: int = 50) -> list[Alert]:
        """The account's alerts, newest first, each with its deliveries and attempts."""
        rows = self.database.rows(
            """SELECT alert_id, account_id, rule_id, kind, fired_at, payload FROM alerts
            WHERE account_id = %(account)s
              AND (%(before)s::text IS NULL OR (fired_at, alert_id) <
                   (SELECT fired_at, alert_id FROM alerts WHERE alert_id = %(before)s))
            ORDER BY fired_at DESC, alert_id DESC LIMIT %(limit)s""",
            {"account": account_id, "before": before, "limit": limit},
        )
        ids = [row["alert_id"] for row in rows]
        deliveries = self.database.rows(
            "SELECT alert_id, channel, state, attempts, next_attempt_at, delivered_at "
            "FROM alert_deliveries WHERE alert_id = ANY(%(ids)s) ORDER BY channel",
            {"ids": ids},
        )
        attempts = self.database.rows(
            "SELECT alert_id, channel, attempt, at, status, error FROM alert_attempts "
            "WHERE alert_id = ANY(%(ids)s) ORDER BY attempt",
            {"ids": ids},
        )
        tried: dict[tuple[str, str], list[Attempt]] = {}
        for a in attempts:
            tried.setdefault((a["alert_id"], a["channel"]), []).append(
                Attempt(a["attempt"], a["at"], a["status"], a["error"])
            )
        by_alert: dict[str, list[Delivery]] = {}
        for d in deliveries:
            by_alert.setdefault(d["alert_id"], []).append(
                Delivery(
                    channel=Channel(d["channel"]),
                    state=d["state"],
                    attempts=tried.get((d["alert_id"], d["channel"]), []),
                    next_attempt_at=d["next_attempt_at"] if d["state"] == "pending" else None,
                    delivered_at=d["delivered_at"],
                )
            )
        return [
            Alert(
                alert_id=row["alert_id"],
                account_id=row["account_id"],
                rule_id=row["rule_id"],
                kind=AlertKind(row["kind"]),
                fired_at=row["fired_at"],
                payload=row["payload"],
                deliveries=by_alert.get(row["alert_id"], []),
            )
            for row in rows
        ]
