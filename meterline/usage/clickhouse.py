"""The usage store on ClickHouse (chDB in-process, or a server): all of its SQL.

``usage_events`` is a ReplacingMergeTree keyed by (account, time, event id)
and read with ``FINAL``: a second copy of an event, however it was written,
is one row to every query. ``usage_minutely`` is the rollup, also replacing:
after each write the minutes it touched are recounted from the deduplicated
events, stamped with the server's clock at the recount's start. A later
recount saw every part an earlier one saw, so the newest stamp is always the
fullest count, whichever instance wrote it and in whatever order they end.
A report takes whole minutes from the rollup and only the edges from raw events.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from meterline.lib.warehouse.base import Value, Warehouse, answers
from meterline.lib.warehouse.schema import USAGE_EVENT_COLUMNS, recount_minutes
from meterline.money import picos_to_usd, usd_to_picos
from meterline.tokens import TOKEN_FIELDS, TokenUsage
from meterline.usage.model import EventKey, PricedEvent
from meterline.usage.report import Dimension, UsageGroup, UsageReport, UsageTotals

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The stored keys whose hash is among a batch's (the caller compares the ids).
_STORED_KEYS = """
SELECT account_id, event_id, toUnixTimestamp64Milli(occurred_at) AS occurred_ms
FROM dedupe_keys PREWHERE key_hash IN {hashes:Array(UInt64)}
"""


def key_hash(account_id: str, event_id: str) -> int:
    """``DEDUPE_KEY_HASH`` of one key, computed here: the lookup sends numbers, not ids."""
    digest = hashlib.md5(f"{account_id}\0{event_id}".encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big")


_EVENT_SELECT = ", ".join(
    {
        "occurred_at": "toUnixTimestamp64Milli(occurred_at) AS occurred_ms",
        "received_at": "toUnixTimestamp64Milli(received_at) AS received_ms",
        "priced_at": "toUnixTimestamp64Micro(priced_at) AS priced_us",
        "cost_usd": "toString(cost_usd) AS cost",
        "charge_usd": "toString(charge_usd) AS charge",
    }.get(c, c)
    for c in USAGE_EVENT_COLUMNS
)

_STORED_EVENTS = f"""
SELECT {_EVENT_SELECT} FROM usage_events FINAL
WHERE account_id IN {{accounts:Array(String)}}
  AND (account_id, toUnixTimestamp64Milli(occurred_at), event_id) IN (
      SELECT tuple.1, tuple.2, tuple.3 FROM (SELECT arrayJoin(arrayZip(
          {{accounts_k:Array(String)}}, {{times_k:Array(Int64)}}, {{ids_k:Array(String)}}
      )) AS tuple))
"""

#: Recount the minutes of ``buckets`` (account, minute since the epoch) from raw events.
_RECOUNT = recount_minutes("""WHERE account_id IN {accounts:Array(String)}
  AND occurred_at >= {low:DateTime64(3, 'UTC')} AND occurred_at < {high:DateTime64(3, 'UTC')}
  AND (account_id, intDiv(toUnixTimestamp(occurred_at), 60)) IN (
      SELECT pair.1, pair.2 FROM (SELECT arrayJoin(arrayZip(
          {bucket_accounts:Array(String)}, {bucket_minutes:Array(UInt32)})) AS pair))""")


def _rows(events: Sequence[PricedEvent], priced_at: datetime) -> list[tuple[Value, ...]]:
    """Rows in ``USAGE_EVENT_COLUMNS`` order."""
    return [
        (
            e.account_id,
            e.event_id,
            e.occurred_at,
            e.received_at,
            e.api_key_id,
            e.model,
            e.provider,
            e.status,
            e.usage.input_tokens,
            e.usage.cached_input_tokens,
            e.usage.cache_write_5m_tokens,
            e.usage.cache_write_1h_tokens,
            e.usage.output_tokens,
            e.usage.reasoning_tokens,
            e.latency_ms,
            e.ttft_ms,
            1 if e.price_id else 0,
            e.price_id,
            e.price_tier,
            picos_to_usd(e.cost_picos),
            e.kafka_partition,
            e.kafka_offset,
            e.provider_usage_json,
            priced_at,
            picos_to_usd(e.charge_picos),
            e.plan_id,
            e.plan_version,
        )
        for e in events
    ]


def _millis(value: Any) -> datetime:
    return _EPOCH + timedelta(milliseconds=int(value))


def _event(row: dict[str, Any]) -> PricedEvent:
    return PricedEvent(
        account_id=row["account_id"],
        event_id=row["event_id"],
        api_key_id=row["api_key_id"],
        model=row["model"],
        provider=row["provider"],
        occurred_at=_millis(row["occurred_ms"]),
        received_at=_millis(row["received_ms"]),
        status=row["status"],
        usage=TokenUsage(*(int(row[c]) for c in TOKEN_FIELDS)),
        latency_ms=int(row["latency_ms"]),
        ttft_ms=int(row["ttft_ms"]),
        price_id=row["price_id"],
        price_tier=row["price_tier"],
        cost_picos=usd_to_picos(Decimal(row["cost"])),
        provider_usage_json=row["provider_usage_json"],
        kafka_partition=int(row["kafka_partition"]),
        kafka_offset=int(row["kafka_offset"]),
        charge_picos=usd_to_picos(Decimal(row["charge"])),
        plan_id=row["plan_id"],
        plan_version=int(row["plan_version"]),
    )


def _minute(moment: datetime) -> int:
    return int((moment - _EPOCH).total_seconds()) // 60


class ClickHouseUsageStore:
    """:class:`~meterline.usage.store.UsageStore` on a :class:`Warehouse`."""

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse

    def stored(self, keys: Collection[EventKey]) -> dict[EventKey, PricedEvent]:
        if not keys:
            return {}
        hashes = sorted({key_hash(*key) for key in keys})
        found = [
            row
            for row in self.warehouse.query(_STORED_KEYS, {"hashes": hashes})
            if (row["account_id"], row["event_id"]) in keys
        ]
        if not found:
            return {}
        rows = self.warehouse.query(
            _STORED_EVENTS,
            {
                "accounts": sorted({r["account_id"] for r in found}),
                "accounts_k": [r["account_id"] for r in found],
                "times_k": [int(r["occurred_ms"]) for r in found],
                "ids_k": [r["event_id"] for r in found],
            },
        )
        events = (_event(row) for row in rows)
        return {e.key: e for e in events if e.key in keys}

    def insert_priced(self, events: Sequence[PricedEvent]) -> None:
        if not events:
            return
        self.warehouse.insert("usage_events", USAGE_EVENT_COLUMNS, _rows(events, datetime.now(UTC)))
        self.recount(events)

    def unpriced(
        self, start: datetime, end: datetime, accounts: Sequence[str] = ()
    ) -> list[PricedEvent]:
        account_filter = "AND account_id IN {accounts:Array(String)}" if accounts else ""
        rows = self.warehouse.query(
            f"SELECT {_EVENT_SELECT} FROM usage_events FINAL WHERE priced = 0 {account_filter} "
            "AND occurred_at >= {start:DateTime64(3, 'UTC')} "
            "AND occurred_at < {end:DateTime64(3, 'UTC')}",
            {"start": start, "end": end, "accounts": list(accounts)},
        )
        return [_event(row) for row in rows]

    def recount(self, events: Sequence[PricedEvent]) -> None:
        if not events:
            return
        buckets = sorted({(e.account_id, _minute(e.occurred_at)) for e in events})
        low = min(e.occurred_at for e in events).replace(second=0, microsecond=0)
        high = max(e.occurred_at for e in events).replace(second=0, microsecond=0)
        self.warehouse.command(
            _RECOUNT,
            {
                "accounts": sorted({b[0] for b in buckets}),
                "low": low,
                "high": high + timedelta(minutes=1),
                "bucket_accounts": [b[0] for b in buckets],
                "bucket_minutes": [b[1] for b in buckets],
            },
        )

    def reachable(self) -> bool:
        return answers(self.warehouse)

    def report(
        self, account_id: str, start: datetime, end: datetime, group_by: Sequence[Dimension]
    ) -> UsageReport:
        first_minute = start.replace(second=0, microsecond=0)
        if first_minute < start:
            first_minute += timedelta(minutes=1)
        last_minute = end.replace(second=0, microsecond=0)
        rollup = first_minute < last_minute
        rows = self.warehouse.query(
            report_sql(group_by, rollup=rollup),
            {
                "account_id": account_id,
                "start": start,
                "end": end,
                "first_minute": first_minute if rollup else end,
                "last_minute": last_minute if rollup else end,
            },
        )
        report = UsageReport(
            account_id=account_id,
            start=start,
            end=end,
            group_by=tuple(group_by),
            source="usage_minutely" if rollup else "usage_events",
        )
        for row in rows:
            totals = UsageTotals(
                requests=int(row["requests"]),
                unpriced_requests=int(row["unpriced_requests"]),
                **{c: int(row[c]) for c in TOKEN_FIELDS},
                cost_usd=Decimal(row["cost_usd"]),
                charge_usd=Decimal(row["charge_usd"]),
            )
            if totals.requests == 0:
                continue
            report.totals.add(totals)
            if group_by:
                report.groups.append(UsageGroup({d: _text(row[d]) for d in group_by}, totals))
        return report


def report_sql(group_by: Sequence[Dimension], *, rollup: bool) -> str:
    """The SELECT of a usage report; dimensions come from a fixed list, never from input.

    Whole minutes [first_minute, last_minute) come from the rollup, the rest
    of [start, end) from raw events; without ``rollup`` both minutes are
    ``end`` and all of [start, end) is raw.
    """
    tokens = ", ".join(TOKEN_FIELDS)
    parts = [
        f"SELECT model, provider, toDate(occurred_at) AS day, toUInt64(1) AS requests, "
        f"toUInt64(1 - priced) AS unpriced_requests, {tokens}, cost_usd, charge_usd "
        "FROM usage_events FINAL WHERE account_id = {account_id:String} "
        # two ranges the primary key can seek to, not a NOT it would read around
        "AND ((occurred_at >= {start:DateTime64(3, 'UTC')} "
        "AND occurred_at < {first_minute:DateTime64(3, 'UTC')}) "
        "OR (occurred_at >= {last_minute:DateTime64(3, 'UTC')} "
        "AND occurred_at < {end:DateTime64(3, 'UTC')}))"
    ]
    if rollup:
        parts.append(
            f"SELECT model, provider, toDate(minute) AS day, requests, unpriced_requests, "
            f"{tokens}, cost_usd, charge_usd FROM usage_minutely FINAL "
            "WHERE account_id = {account_id:String} "
            "AND minute >= {first_minute:DateTime64(3, 'UTC')} "
            "AND minute < {last_minute:DateTime64(3, 'UTC')}"
        )
    measures = [
        "sum(requests) AS requests",
        "sum(unpriced_requests) AS unpriced_requests",
        *(f"sum({c}) AS {c}" for c in TOKEN_FIELDS),
        "toString(sum(toDecimal256(cost_usd, 12))) AS cost_usd",
        "toString(sum(toDecimal256(charge_usd, 12))) AS charge_usd",
    ]
    sql = f"SELECT {', '.join([*group_by, *measures])} FROM ({' UNION ALL '.join(parts)})"
    if group_by:
        names = ", ".join(group_by)
        sql += f" GROUP BY {names} ORDER BY {names}"
    return sql


def _text(value: object) -> str:
    """A group key as text: chDB gives dates as text, clickhouse-connect as ``date``."""
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
