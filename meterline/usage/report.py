"""Usage, cost and charge of an account over a time range: what every API answers with.

``cost_usd`` is what the providers charged, ``charge_usd`` what the account pays
(its plan's sell price over that cost).

The store (:mod:`.clickhouse`) reads whole minutes from its rollup and the
edges from raw events, so a total is exact to the millisecond asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from meterline.lib.warehouse.base import Warehouse
from meterline.money import format_usd

Dimension = Literal["model", "provider", "day"]
DIMENSIONS: tuple[Dimension, ...] = ("model", "provider", "day")


@dataclass
class UsageTotals:
    """What a set of requests used, cost and was charged."""

    requests: int = 0
    unpriced_requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    charge_usd: Decimal = Decimal(0)

    def add(self, other: UsageTotals) -> None:
        for name in vars(other):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, int | str]:
        return {k: format_usd(v) if isinstance(v, Decimal) else v for k, v in vars(self).items()}


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


def usage_report(
    warehouse: Warehouse,
    account_id: str,
    start: datetime,
    end: datetime,
    group_by: Sequence[Dimension] = (),
) -> UsageReport:
    """Usage of ``account_id`` in [start, end), per group and in total."""
    from meterline.usage.clickhouse import ClickHouseUsageStore  # the adapter imports this module

    if end <= start:
        raise ValueError(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    return ClickHouseUsageStore(warehouse).report(
        account_id, start, end, tuple(dict.fromkeys(group_by))
    )


def month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
