"""The warehouse schema: idempotent migrations, and the DDL operators get."""

from __future__ import annotations

from pathlib import Path

from meterline.warehouse import Warehouse
from meterline.warehouse.schema import MIGRATIONS, migrate, schema_sql

DEPLOY_SQL = Path(__file__).parent.parent / "deploy" / "clickhouse" / "schema.sql"


def test_migrations_apply_once(warehouse: Warehouse) -> None:
    assert migrate(warehouse) == []  # the session fixture already applied them
    applied = warehouse.query("SELECT version FROM schema_migrations FINAL ORDER BY version")
    assert [r["version"] for r in applied] == [m[0] for m in MIGRATIONS]


def test_deploy_ddl_is_the_generated_schema() -> None:
    assert DEPLOY_SQL.read_text() == schema_sql(), (
        "deploy/clickhouse/schema.sql is stale: meterline schema > deploy/clickhouse/schema.sql"
    )
