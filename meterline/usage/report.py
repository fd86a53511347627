"""Usage and cost of an account over a time range: the query both APIs answer from.

Hour-aligned ranges are read from the ``usage_hourly`` rollup; any other
range from the raw events, so a total is exact to the millisecond asked for.
Either way the sums include re-pricing reversals (``sign``), and money comes
back as exact decimal text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Literal

from meterline.lib.warehouse.base import Warehouse
from meterline.lib.warehouse.schema import TOKEN_COLUMNS
from meterline.money import format_usd

Dimension = Literal["model", "provider", "day"]
DIMENSIONS: tuple[Dimension, ...] = ("model", "provider", "day")


@dataclass
class UsageTotals:
    """What a set of requests used and cost."""

    requests: int = 0
    unpriced_requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    def add(self, other: UsageTotals) -> None:
        for name in vars(other):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, int | str]:
        data: dict[str, int | str] = {k: v for k, v in vars(self).items() if k != "cost_usd"}
        data["cost_usd"] = format_usd(self.cost_usd)
        return data


@dataclass
class UsageGroup:
    key: dict[str, str]
    totals: UsageTotals


@dataclass
class UsageReport:
    account_id: str
    start: datetime
    end: datetime
    group_by: tuple[Dimension, ...]
    source: str
    totals: UsageTotals = field(default_factory=UsageTotals)
    groups: list[UsageGroup] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "account_id": self.account_id,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "group_by": list(self.group_by),
            "source": self.source,
            "totals": self.totals.to_json(),
            "groups": [{**g.key, **g.totals.to_json()} for g in self.groups],
        }


def _hour_aligned(moment: datetime) -> bool:
    return moment == moment.replace(minute=0, second=0, microsecond=0)


def usage_sql(group_by: Sequence[Dimension], *, rollup: bool) -> str:
    """The SELECT for a usage report; dimensions come from a fixed list, never from input."""
    time_column = "hour" if rollup else "occurred_at"
    expressions = {"model": "model", "provider": "provider", "day": f"toDate({time_column})"}
    dims = [f"{expressions[d]} AS {d}" for d in group_by]
    if rollup:
        measures = [
            "sum(requests) AS requests",
            "sum(unpriced_requests) AS unpriced_requests",
            *(f"sum({c}) AS {c}" for c in TOKEN_COLUMNS),
            "toString(sum(cost_usd)) AS cost_usd",
        ]
        table = "usage_hourly"
    else:
        measures = [
            "sum(sign) AS requests",
            "sum((1 - priced) * sign) AS unpriced_requests",
            *(f"sum({c} * sign) AS {c}" for c in TOKEN_COLUMNS),
            "toString(sum(cost_usd * sign)) AS cost_usd",
        ]
        table = "usage_events"
    sql = (
        f"SELECT {', '.join([*dims, *measures])} FROM {table} "
        f"WHERE account_id = {{account_id:String}} "
        f"AND {time_column} >= {{start:DateTime64(3, 'UTC')}} "
        f"AND {time_column} < {{end:DateTime64(3, 'UTC')}}"
    )
    if group_by:
        names = ", ".join(group_by)
        sql += f" GROUP BY {names} ORDER BY {names}"
    return sql


def usage_report(
    warehouse: Warehouse,
    account_id: str,
    start: datetime,
    end: datetime,
    group_by: Sequence[Dimension] = (),
) -> UsageReport:
    """Usage of ``account_id`` in [start, end), per group and in total."""
    if end <= start:
        raise ValueError(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    group_by = tuple(dict.fromkeys(group_by))  # drop repeats, keep order
    rollup = _hour_aligned(start) and _hour_aligned(end)
    rows = warehouse.query(
        usage_sql(group_by, rollup=rollup),
        {"account_id": account_id, "start": start, "end": end},
    )
    report = UsageReport(
        account_id=account_id,
        start=start,
        end=end,
        group_by=group_by,
        source="usage_hourly" if rollup else "usage_events",
    )
    for row in rows:
        totals = UsageTotals(
            requests=int(row["requests"]),
            unpriced_requests=int(row["unpriced_requests"]),
            **{c: int(row[c]) for c in TOKEN_COLUMNS},
            cost_usd=Decimal(row["cost_usd"]),
        )
        if not group_by and totals.requests == 0:
            continue
        report.totals.add(totals)
        if group_by:
            report.groups.append(UsageGroup({d: _text(row[d]) for d in group_by}, totals))
    return report


def _text(value: object) -> str:
    """A group key as text: chDB gives dates as text, clickhouse-connect as ``date``."""
    return value.isoformat() if isinstance(value, date) else str(value)


def month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
