"""Day and month counters rebuilt from the warehouse, while settles go on.

Redis is a cache of the warehouse. A counter it does not hold (Redis restarted empty,
a plan began to cap a window, a key was evicted) is rebuilt from the priced events in
ClickHouse, and the pricing pipeline keeps settling into Redis meanwhile. An event is
stored before it is settled, so a naive "read the totals, write them" counts twice an
event stored before the read and settled after the write, and drops one stored after
the read and settled (into nothing) before the write. The protocol:

1. :meth:`~.engine.QuotaEngine.begin_rebuild` makes each absent window at zero,
   marked *building since B* (Redis's clock). Checks take it as absent; settles count
   into it from B on. Every event settled before B was stored before B.
2. The warehouse is read after B, in one query (one snapshot): the window's totals
   T, and the *recent* events R of T, those priced since B - :data:`REBUILD_LAG`.
3. :meth:`~.engine.QuotaEngine.finish_rebuild`, in one script: the window becomes
   (settled since B) + T, less the events of R settled since B (each settle into a
   building window notes its event there; they would count twice otherwise); each
   event of R not settled at all yet is marked in the window, so its settle will not
   add it again. Only the rebuild that began the building finishes it
   (another finds it complete and changes nothing).

Nothing is then lost, and an event counts twice only if its settle came more than
:data:`REBUILD_LAG` after it was priced (the pipeline stuck that long between storing
a batch and settling it): a counter is then over, never under, what was used. A
rebuild that dies between the steps leaves the window building; the next check that
finds it rebuilds it, from the same B.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from meterline.lib.warehouse import Warehouse
from meterline.money import usd_to_picos
from meterline.quotas.engine import (
    QuotaEngine,
    RecentEvent,
    WindowRef,
    WindowTotals,
    request_scopes,
)
from meterline.quotas.plans import PlanVersion

__all__ = ["REBUILD_LAG", "Usage", "WarehouseCounts", "rebuild"]

#: The longest an event's settle may come after it was priced without the rebuild
#: counting it twice (see above): far above a batch's store-then-settle.
REBUILD_LAG = timedelta(minutes=5)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_IN_RANGE = (
    "occurred_at >= {{start_{k}:DateTime64(3, 'UTC')}} "
    "AND occurred_at < {{end_{k}:DateTime64(3, 'UTC')}}"
)


def _read_sql(ranges: int) -> str:
    """One query, so one snapshot of the table: per (API key, model) the totals of each
    range, and the events priced since ``since`` (which those totals hold)."""
    sums = []
    for k in range(ranges):
        cond = _IN_RANGE.format(k=k)
        sums += [
            f"toUInt64(countIf({cond})) AS requests_{k}",
            f"toUInt64(sumIf(input_tokens, {cond})) AS input_{k}",
            f"toUInt64(sumIf(output_tokens, {cond})) AS output_{k}",
            f"toString(sumIf(toDecimal256(charge_usd, 12), {cond})) AS charge_{k}",
        ]
    return f"""
SELECT api_key_id, model, {", ".join(sums)},
       groupArrayIf((event_id, toUnixTimestamp64Milli(occurred_at), input_tokens,
                     output_tokens, toString(charge_usd)),
                    priced_at >= {{since:DateTime64(6, 'UTC')}}) AS recent
FROM usage_events FINAL
WHERE account_id = {{account:String}}
  AND occurred_at >= {{start:DateTime64(3, 'UTC')}} AND occurred_at < {{end:DateTime64(3, 'UTC')}}
GROUP BY api_key_id, model
"""


@dataclass(frozen=True, slots=True)
class Usage:
    """The warehouse's usage of one account's (API key, model), per range asked."""

    api_key_id: str | None
    model: str
    #: one per range, in the order asked
    totals: list[WindowTotals]
    #: its events priced since the instant asked
    recent: list[RecentEvent]


class WarehouseCounts:
    """What the warehouse holds of an account's usage, for rebuilds. Blocking."""

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse

    def usage(
        self, account_id: str, ranges: Sequence[tuple[datetime, datetime]], since: datetime
    ) -> list[Usage]:
        """Per (API key, model): the totals of each [start, end) of ``ranges``, and the
        events of them priced at or after ``since``; all of one snapshot."""
        params: dict[str, Any] = {
            "account": account_id,
            "since": since,
            "start": min(start for start, _ in ranges),
            "end": max(end for _, end in ranges),
        }
        for k, (start, end) in enumerate(ranges):
            params[f"start_{k}"], params[f"end_{k}"] = start, end
        found = []
        for row in self.warehouse.query(_read_sql(len(ranges)), params):
            api_key_id, model = row["api_key_id"] or None, row["model"]
            totals = [
                WindowTotals(
                    int(row[f"requests_{k}"]),
                    int(row[f"input_{k}"]),
                    int(row[f"output_{k}"]),
                    usd_to_picos(Decimal(row[f"charge_{k}"])),
                )
                for k in range(len(ranges))
            ]
            recent = [
                RecentEvent(
                    event_id=str(event_id),
                    api_key_id=api_key_id,
                    model=model,
                    occurred_at=_EPOCH + timedelta(milliseconds=int(occurred_ms)),
                    input_tokens=int(input_tokens),
                    output_tokens=int(output_tokens),
                    charge_picos=usd_to_picos(Decimal(charge)),
                )
                for event_id, occurred_ms, input_tokens, output_tokens, charge in row["recent"]
            ]
            found.append(Usage(api_key_id, model, totals, recent))
        return found


def _add(a: WindowTotals, b: WindowTotals) -> WindowTotals:
    return WindowTotals(
        a.requests + b.requests,
        a.input_tokens + b.input_tokens,
        a.output_tokens + b.output_tokens,
        a.charge_picos + b.charge_picos,
    )


async def rebuild(
    engine: QuotaEngine,
    counts: WarehouseCounts,
    account_id: str,
    plan: PlanVersion,
    refs: Sequence[WindowRef],
) -> int:
    """Rebuild the windows of ``refs`` that Redis does not hold, from the warehouse.
    Returns the windows this call completed."""
    since = await engine.begin_rebuild(account_id, refs)
    building = [(ref, b) for ref, b in zip(refs, since, strict=True) if b]
    if not building:
        return 0
    oldest = _EPOCH + timedelta(milliseconds=min(b for _, b in building)) - REBUILD_LAG
    ranges = sorted({(ref.start, ref.end) for ref, _ in building})
    found = await asyncio.to_thread(counts.usage, account_id, ranges, oldest)
    builds = []
    for ref, b in building:
        k = ranges.index((ref.start, ref.end))
        totals = WindowTotals()
        for usage in found:
            # which scopes a request falls in: the engine's own rule
            if any(s == ref.scope for s, _ in request_scopes(plan, usage.api_key_id, usage.model)):
                totals = _add(totals, usage.totals[k])
        builds.append((ref, b, totals))
    recent = [event for usage in found for event in usage.recent]
    return await engine.finish_rebuild(account_id, plan, builds, recent)
