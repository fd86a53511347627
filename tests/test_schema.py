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
from datetime import UTC, datetime
from meterline.lib.warehouse import USAGE_EVENT_COLUMNS
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse import schema

warehouse = ChdbWarehouse(sys.argv[1])
full = schema.MIGRATIONS
schema.MIGRATIONS = full[:2]  # a warehouse as the version before dedupe_keys left it
schema.migrate(warehouse)
at = datetime(2026, 11, 1, tzinfo=UTC)
row = dict.fromkeys(USAGE_EVENT_COLUMNS, 0)
row.update(occurred_at=at, received_at=at, api_key_id="", model="m", provider="p",
           status="ok", price_id="", price_tier="", sign=1, provider_usage_json="")
rows = [{**row, "account_id": f"acct-{i % 3}", "event_id": f"ev-{i}"} for i in range(500)]
warehouse.insert("usage_events", USAGE_EVENT_COLUMNS, [list(r.values()) for r in rows])
schema.MIGRATIONS = full
applied = schema.migrate(warehouse)
upgrade = full[2][2]
for statement in upgrade:  # a second attempt, as after a crash mid-migration
    warehouse.command(statement)
keys = warehouse.query(
    "SELECT count() AS n, uniqExact(account_id, event_id) AS u FROM dedupe_keys FINAL"
)
tables = warehouse.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
print(json.dumps({"applied": applied, "keys": keys, "tables": sorted(t["name"] for t in tables)}))
"""


def test_upgrade_carries_the_stored_dedupe_keys_over(tmp_path: Path) -> None:
    """Events stored before the upgrade are still recognised when replayed after it."""
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
    assert result["applied"] == [3]
    assert result["keys"] == [{"n": 500, "u": 500}]
    assert "event_keys" not in result["tables"] and "event_keys_mv" not in result["tables"]
    assert {"dedupe_keys", "dedupe_keys_mv"} <= set(result["tables"])


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
