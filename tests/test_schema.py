"""The warehouse schema: idempotent migrations, and the DDL operators get."""

from __future__ import annotations

from pathlib import Path

from meterline.lib.warehouse import Warehouse
from meterline.lib.warehouse.schema import DEDUPE_KEY_HASH, MIGRATIONS, migrate, schema_sql

DEPLOY_SQL = Path(__file__).parent.parent / "deploy" / "clickhouse" / "schema.sql"


def test_migrations_apply_once(warehouse: Warehouse) -> None:
    assert migrate(warehouse) == []  # the session fixture already applied them
    applied = warehouse.query("SELECT version FROM schema_migrations FINAL ORDER BY version")
    assert [r["version"] for r in applied] == [m[0] for m in MIGRATIONS]


def test_deploy_ddl_is_the_generated_schema() -> None:
    assert DEPLOY_SQL.read_text() == schema_sql(), (
        "deploy/clickhouse/schema.sql is stale: meterline schema > deploy/clickhouse/schema.sql"
    )


UPGRADE = """
import json, sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse import schema

warehouse = ChdbWarehouse(sys.argv[1])
full = schema.MIGRATIONS
schema.MIGRATIONS = full[:3]  # a warehouse as migration 3 left it: signed rows, hourly sums
schema.migrate(warehouse)
columns = [c["name"] for c in warehouse.query("DESCRIBE TABLE usage_events")]
columns.remove("inserted_at")
at = datetime(2026, 11, 1, tzinfo=UTC)
def row(i, **values):
    base = dict.fromkeys(columns, 0)
    base.update(occurred_at=at, received_at=at, api_key_id="", model="m", provider="p",
                status="ok", price_id="", price_tier="", sign=1, provider_usage_json="",
                cost_usd=Decimal(0), account_id=f"acct-{i % 3}", event_id=f"ev-{i}")
    base.update(values)
    return [base[c] for c in columns]
warehouse.insert("usage_events", columns, [row(i) for i in range(500)])
# ev-0 was re-priced the old way: a reversal of the unpriced row, then the priced row
warehouse.insert("usage_events", columns, [row(0, sign=-1)])
warehouse.insert("usage_events", columns,
                 [row(0, priced=1, price_id="pv_new", cost_usd=Decimal("1.5"))])
schema.MIGRATIONS = full
applied = schema.migrate(warehouse)
schema.apply(warehouse, full[3][2])  # a second attempt, as after a crash mid-migration
schema.apply(warehouse, full[4][2])
events = warehouse.query(
    "SELECT count() AS n, toString(sum(cost_usd)) AS cost, sum(priced) AS priced, "
    "toString(sum(charge_usd)) AS charge FROM usage_events FINAL"
)
rollup = warehouse.query(
    "SELECT sum(requests) AS n, toString(sum(cost_usd)) AS cost, "
    "toString(sum(charge_usd)) AS charge FROM usage_minutely FINAL"
)
keys = warehouse.query("SELECT uniqExact(account_id, event_id) AS u FROM dedupe_keys")
tables = warehouse.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
print(json.dumps({"applied": applied, "events": events, "rollup": rollup, "keys": keys,
                  "tables": sorted(t["name"] for t in tables)}))
"""


def test_upgrade_keeps_every_event_once_with_its_newest_price(tmp_path: Path) -> None:
    """Signed rows become one row per event; the rollup and dedupe keys follow."""
    import json
    import subprocess
    import sys

    # a process of its own: chDB opens one data directory per process
    out = subprocess.run(
        [sys.executable, "-c", UPGRADE, str(tmp_path / "chdb")],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["applied"] == [4, 5]
    # no plan before migration 5: what the account paid was the cost
    assert result["events"] == [{"n": 500, "cost": "1.5", "priced": 1, "charge": "1.5"}]
    assert result["rollup"] == [{"n": 500, "cost": "1.5", "charge": "1.5"}]
    assert result["keys"] == [{"u": 500}]
    assert {"usage_events", "usage_minutely", "dedupe_keys", "dedupe_keys_mv"} <= set(
        result["tables"]
    )
    gone = {"usage_hourly", "usage_hourly_mv", "usage_events_signed", "usage_events_replacing"}
    assert not gone & set(result["tables"])


UPGRADE_FROM_4 = """
import json, sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse import schema
from meterline.usage.report import usage_report

warehouse = ChdbWarehouse(sys.argv[1])
full = schema.MIGRATIONS
schema.MIGRATIONS = full[:4]  # a warehouse as migration 4 left it: no charge_usd
schema.migrate(warehouse)
columns = [c["name"] for c in warehouse.query("DESCRIBE TABLE usage_events")]
at = datetime(2026, 11, 1, 10, 0, 30, tzinfo=UTC)
def row(i):
    base = dict.fromkeys(columns, 0)
    base.update(occurred_at=at + timedelta(seconds=i), received_at=at, api_key_id="",
                model="m", provider="p", status="ok", price_id="pv_old", price_tier="",
                priced=1, provider_usage_json="", cost_usd=Decimal("0.000000000001") * (i + 1),
                account_id="acct-old", event_id=f"ev-{i}", priced_at=at)
    return [base[c] for c in columns]
warehouse.insert("usage_events", columns, [row(i) for i in range(100)])
warehouse.command(schema.recount_minutes(charge=False))  # the rollup as the old pipeline left it
schema.MIGRATIONS = full
# the columns first: old rows read charge = cost through the DEFAULT, before any recount
for statement in full[4][2][:4]:
    warehouse.command(statement)
read = lambda table, n: warehouse.query(
    f"SELECT {n} AS n, toString(sum(cost_usd)) AS cost, toString(sum(charge_usd)) AS charge "
    f"FROM {table} FINAL"
)
before_recount = [read("usage_events", "count()"), read("usage_minutely", "sum(requests)")]
applied = schema.migrate(warehouse)
schema.apply(warehouse, full[4][2])  # a second attempt, as after a crash mid-migration
plans = warehouse.query(
    "SELECT DISTINCT plan_id, plan_version FROM usage_events FINAL"
)
reports = [
    usage_report(warehouse, "acct-old", start, end).totals.to_json()
    for start, end in ((datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC)),
                       (at, datetime(2026, 11, 2, tzinfo=UTC)))
]
print(json.dumps({"applied": applied, "before_recount": before_recount,
                  "events": read("usage_events", "count()"),
                  "rollup": read("usage_minutely", "sum(requests)"),
                  "plans": plans, "reports": reports}))
"""


def test_upgrade_from_4_charges_old_rows_their_cost(tmp_path: Path) -> None:
    """Rows written before migration 5 had no plan: their charge is their cost, in the
    events, the rollup and the report, with no rewrite of the rows."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", UPGRADE_FROM_4, str(tmp_path / "chdb")],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["applied"] == [5]
    summed = {"n": 100, "cost": "0.00000000505", "charge": "0.00000000505"}  # 1 + ... + 100 picos
    assert result["before_recount"] == [[summed], [summed]]
    assert result["events"] == result["rollup"] == [summed]
    assert result["plans"] == [{"plan_id": "", "plan_version": 0}]
    for totals in result["reports"]:  # whole minutes from the rollup, the edges raw
        assert (totals["requests"], totals["cost_usd"], totals["charge_usd"]) == (
            100,
            "0.00000000505",
            "0.00000000505",
        )


def test_a_dedupe_lookup_reads_only_the_granules_of_its_keys(warehouse: Warehouse) -> None:
    """However many keys the 40 days hold, a batch's lookup reads those of its own keys."""
    table = "dedupe_keys_sized"
    warehouse.command(f"CREATE TABLE {table} AS dedupe_keys")
    warehouse.command(
        f"INSERT INTO {table} SELECT {DEDUPE_KEY_HASH}, account_id, event_id, now64(3) FROM "
        "(SELECT concat('acct-', toString(number % 100)) AS account_id,"
        " concat('ev-', toString(number)) AS event_id FROM numbers(300000))"
    )
    warehouse.command(f"OPTIMIZE TABLE {table} FINAL")
    plan = warehouse.query(
        f"EXPLAIN indexes = 1 SELECT account_id, event_id FROM {table} PREWHERE key_hash IN "
        f"(SELECT {DEDUPE_KEY_HASH} FROM (SELECT 'acct-7' AS account_id,"
        " concat('ev-', toString(number * 100 + 7)) AS event_id FROM numbers(20)))"
    )
    warehouse.command(f"DROP TABLE {table}")
    granules = [r["explain"].strip() for r in plan if r["explain"].strip().startswith("Granules:")]
    selected, total = map(int, granules[0].removeprefix("Granules: ").split("/"))
    assert total >= 290 and selected <= 20


def test_the_dedupe_key_hash_is_the_same_in_python_and_in_the_engine(
    warehouse: Warehouse,
) -> None:
    """The lookup sends hashes computed in Python; the keys table holds the engine's."""
    from meterline.usage.clickhouse import key_hash

    keys = [("acct-1", "ev-1"), ("a", ""), ("ünï", "çødé-☃"), ("acct", "x" * 128)]
    rows = warehouse.query(
        f"SELECT {DEDUPE_KEY_HASH} AS h FROM (SELECT arrayJoin(arrayZip("
        "{a:Array(String)}, {e:Array(String)})) AS p, p.1 AS account_id, p.2 AS event_id)",
        {"a": [k[0] for k in keys], "e": [k[1] for k in keys]},
    )
    assert [int(r["h"]) for r in rows] == [key_hash(*k) for k in keys]
