"""The usage of the busiest account over the default range, with many events stored.

Run by hand, not in CI. Fills a fresh chDB directory with N usage events
(default 100 million) of 1,000 accounts over this month, one account with a
tenth of them, builds the minute rollup the way the pipeline's recounts
leave it, then asks the usage report of that account for month start to
now (the API's default range) again and again:

* report: the store's query, whole minutes from ``usage_minutely`` and the
  edges from raw events, as the API answers;
* baseline, in the same run: the same report from raw events only (FINAL).

Prints p50 and p95 of each and their ratio. The machine is shared and
noisy: compare the ratio and the p95 over several runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from meterline.lib.warehouse.base import Param
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse.schema import RECOUNT_ALL_MINUTES, migrate
from meterline.usage.clickhouse import ClickHouseUsageStore, report_sql
from meterline.usage.report import month_start

BUSY = "acct-busiest"

_FILL = """
INSERT INTO usage_events
SELECT
    if(number % 10 = 0, '{busy}', concat('acct-', toString(number % 999))) AS account_id,
    concat('ev-', toString(number)) AS event_id,
    fromUnixTimestamp64Milli(toInt64({start_ms} + intDiv(number * {span_ms}, {total})), 'UTC')
        AS occurred_at,
    occurred_at AS received_at,
    'key-1' AS api_key_id,
    ['gpt-4.1-mini', 'gpt-4.1', 'gpt-4o', 'o3', 'claude-sonnet-4-5', 'gemini-2.5-flash'][
        1 + number % 6] AS model,
    ['openai', 'openai', 'azure', 'openai', 'anthropic', 'google'][1 + number % 6] AS provider,
    'ok' AS status,
    1000 + number % 3000 AS input_tokens,
    (number % 3) * 256 AS cached_input_tokens,
    0 AS cache_write_5m_tokens,
    0 AS cache_write_1h_tokens,
    50 + number % 700 AS output_tokens,
    0 AS reasoning_tokens,
    900 AS latency_ms,
    300 AS ttft_ms,
    1 AS priced,
    'pv_bench' AS price_id,
    'base' AS price_tier,
    toDecimal128((1000 + number % 3000) * 0.0000004 + (50 + number % 700) * 0.0000016, 12)
        AS cost_usd,
    toInt32(number % 6) AS kafka_partition,
    toInt64(number) AS kafka_offset,
    '' AS provider_usage_json,
    now64(6) AS priced_at
FROM numbers({first}, {count})
"""


def fill(warehouse: ChdbWarehouse, total: int, start: datetime, end: datetime) -> None:
    span_ms = int((end - start).total_seconds() * 1000)
    chunk = 10_000_000
    for first in range(0, total, chunk):
        count = min(chunk, total - first)
        warehouse.command(
            _FILL.format(
                busy=BUSY,
                start_ms=int(start.timestamp() * 1000),
                span_ms=span_ms,
                total=total,
                first=first,
                count=count,
            )
        )
        print(f"  {first + count:,} events stored", flush=True)


def timed(run: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main(events: int, repeats: int, data_dir: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        warehouse = ChdbWarehouse(Path(data_dir or tmp) / "chdb")
        migrate(warehouse)
        now = datetime.now(UTC)
        start = month_start(now)
        stored = int(warehouse.query("SELECT count() AS n FROM usage_events")[0]["n"])
        if stored < events:
            print(f"filling {events:,} events over {start:%Y-%m-%d} .. now")
            t = time.perf_counter()
            fill(warehouse, events, start, now)
            # the rollup as the pipeline's recounts leave it: every minute counted once
            warehouse.command(RECOUNT_ALL_MINUTES)
            print(f"  filled and rolled up in {time.perf_counter() - t:.0f} s")
        store = ClickHouseUsageStore(warehouse)
        busy = int(
            warehouse.query(
                "SELECT count() AS n FROM usage_events WHERE account_id = {a:String}", {"a": BUSY}
            )[0]["n"]
        )
        end = datetime.now(UTC)
        params: dict[str, Param] = {
            "account_id": BUSY,
            "start": start,
            "end": end,
            "first_minute": end,
            "last_minute": end,
        }
        report = store.report(BUSY, start, end, ())
        raw = warehouse.query(report_sql((), rollup=False), params)[0]
        assert report.totals.requests == int(raw["requests"]) == busy, (report.totals, raw)
        assert report.totals.cost_usd == Decimal(raw["cost_usd"])
        api = timed(lambda: store.report(BUSY, start, datetime.now(UTC), ()), repeats)
        grouped = timed(
            lambda: store.report(BUSY, start, datetime.now(UTC), ("model", "day")), repeats
        )
        baseline = timed(lambda: warehouse.query(report_sql((), rollup=False), params), repeats)
        print(f"events stored: {events:,}; busiest account: {busy:,} events; repeats: {repeats}")
        for name, times in (
            ("report (rollup + raw edges)", api),
            ("report by model, day", grouped),
            ("baseline: raw events only", baseline),
        ):
            print(
                f"{name:<30} p50 {statistics.median(times) * 1000:7.1f} ms   "
                f"p95 {p95(times) * 1000:7.1f} ms"
            )
        print(f"ratio p95 report/baseline: {p95(api) / p95(baseline):.3f}")
        warehouse.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--data-dir", help="keep (and reuse) the filled warehouse here")
    args = parser.parse_args()
    main(args.events, args.repeats, args.data_dir)
