"""Plans in PostgreSQL: the SQL of the plans slice, all of it.

A version's limits are the :class:`~meterline.quotas.plans.PlanLimits` JSON
in a ``jsonb`` column, read back through :class:`PlanVersion` validation, so
a stored plan obeys the same rules as one posted; its money is ``NUMERIC``,
which psycopg reads as :class:`~decimal.Decimal`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from meterline.accounts.model import AccountNotFound
from meterline.lib.postgres import Database
from meterline.quotas.plans import PlanTerms, PlanVersion
from meterline.quotas.store import Assignment, PlanHistory, PlanNotFound, in_force

__all__ = ["PostgresPlanStore"]

_PLAN_COLUMNS = (
    "plan_id, version, name, limits, price_multiplier, request_fee_usd, billing, created_at"
)
_ASSIGNMENT_COLUMNS = "account_id, plan_id, version, effective_from, assigned_at, assigned_by"
#: First key of the per-plan advisory lock that numbers versions ("plan" in ASCII); the
#: second is the plan_id's hash. Two-key locks never meet the migrations' one-key lock.
_NUMBERING_LOCK = 0x706C616E


def _plan(row: Mapping[str, Any]) -> PlanVersion:
    return PlanVersion.model_validate({k: row[k] for k in PlanVersion.model_fields})


def _assignment(row: Mapping[str, Any]) -> Assignment:
    return Assignment(
        account_id=row["account_id"],
        plan_id=row["plan_id"],
        version=row["version"],
        effective_from=row["effective_from"],
        assigned_at=row["assigned_at"],
        assigned_by=row["assigned_by"],
    )


class PostgresPlanStore:
    """:class:`~meterline.quotas.store.PlanStore` on a migrated :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self.database = database

    # versions

    def add_version(self, plan: PlanTerms) -> PlanVersion:
        with self.database.transaction() as connection:
            cursor = connection.cursor(row_factory=dict_row)
            # One adder of a plan at a time, until its commit: the next one's statement
            # starts after that and sees the row, so max + 1 is a new number. (A unique
            # violation and a retry would work too, at the cost of a loop.)
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%(lock)s, hashtext(%(plan)s))",
                {"lock": _NUMBERING_LOCK, "plan": plan.plan_id},
            )
            row = cursor.execute(
                f"""INSERT INTO plan_versions (plan_id, version, name, limits, price_multiplier,
                                               request_fee_usd, billing)
                SELECT %(plan)s, coalesce(max(version), 0) + 1, %(name)s, %(limits)s,
                       %(multiplier)s, %(fee)s, %(billing)s
                FROM plan_versions WHERE plan_id = %(plan)s
                RETURNING {_PLAN_COLUMNS}""",
                {
                    "plan": plan.plan_id,
                    "name": plan.name,
                    "limits": Jsonb(plan.limits.model_dump(mode="json")),
                    "multiplier": plan.price_multiplier,
                    "fee": plan.request_fee_usd,
                    "billing": plan.billing,
                },
            ).fetchone()
        assert row is not None  # INSERT ... SELECT of an aggregate: always one row
        return _plan(row)

    def version(self, plan_id: str, version: int) -> PlanVersion:
        rows = self.database.rows(
            f"""SELECT {_PLAN_COLUMNS} FROM plan_versions
            WHERE plan_id = %(plan)s AND version = %(version)s""",
            {"plan": plan_id, "version": version},
        )
        if not rows:
            raise PlanNotFound(f"no plan {plan_id!r} version {version}")
        return _plan(rows[0])

    def versions(self, plan_id: str) -> list[PlanVersion]:
        rows = self.database.rows(
            f"SELECT {_PLAN_COLUMNS} FROM plan_versions WHERE plan_id = %(plan)s ORDER BY version",
            {"plan": plan_id},
        )
        if not rows:
            raise PlanNotFound(f"no plan {plan_id!r}")
        return [_plan(r) for r in rows]

    def plans(self) -> list[PlanVersion]:
        rows = self.database.rows(
            f"""SELECT DISTINCT ON (plan_id) {_PLAN_COLUMNS} FROM plan_versions
            ORDER BY plan_id, version DESC"""
        )
        return [_plan(r) for r in rows]

    # assignments

    def assign(
        self,
        account_id: str,
        plan_id: str,
        version: int | None,
        effective_from: datetime,
        assigned_by: str,
    ) -> Assignment:
        try:
            # the version is read in the same statement, so "the latest" is the one
            # that exists when the row is written
            rows = self.database.rows(
                f"""INSERT INTO account_plans (account_id, plan_id, version, effective_from,
                                               assigned_by)
                SELECT %(account)s, plan_id, version, %(from)s, %(by)s FROM plan_versions
                WHERE plan_id = %(plan)s AND (%(version)s::integer IS NULL
                                              OR version = %(version)s::integer)
                ORDER BY version DESC LIMIT 1
                ON CONFLICT (account_id, effective_from) DO UPDATE
                    SET plan_id = excluded.plan_id, version = excluded.version,
                        assigned_at = now(), assigned_by = excluded.assigned_by
                RETURNING {_ASSIGNMENT_COLUMNS}""",
                {
                    "account": account_id,
                    "plan": plan_id,
                    "version": version,
                    "from": effective_from,
                    "by": assigned_by,
                },
            )
        except psycopg.errors.ForeignKeyViolation as exc:
            if exc.diag.constraint_name == "account_plans_account_fkey":
                raise AccountNotFound(f"no account {account_id!r}") from None
            raise
        if not rows:
            which = "" if version is None else f" version {version}"
            raise PlanNotFound(f"no plan {plan_id!r}{which}")
        return _assignment(rows[0])

    def plan_of(self, account_id: str, at: datetime) -> tuple[Assignment, PlanVersion] | None:
        return in_force(self.histories([account_id])[account_id], at)

    def histories(self, account_ids: Collection[str]) -> dict[str, PlanHistory]:
        rows = self.database.rows(
            """SELECT a.account_id, plan_id, version, a.effective_from, a.assigned_at,
                      a.assigned_by, p.name, p.limits, p.price_multiplier, p.request_fee_usd,
                      p.billing, p.created_at
            FROM account_plans a JOIN plan_versions p USING (plan_id, version)
            WHERE a.account_id = ANY(%(accounts)s)
            ORDER BY a.account_id, a.effective_from""",
            {"accounts": list(account_ids)},
        )
        found: dict[str, list[tuple[Assignment, PlanVersion]]] = {a: [] for a in account_ids}
        for row in rows:
            found[row["account_id"]].append((_assignment(row), _plan(row)))
        return dict(found)

    def assignments(self, account_id: str) -> list[Assignment]:
        rows = self.database.rows(
            f"""SELECT {_ASSIGNMENT_COLUMNS} FROM account_plans
            WHERE account_id = %(account)s ORDER BY effective_from""",
            {"account": account_id},
        )
        return [_assignment(r) for r in rows]
