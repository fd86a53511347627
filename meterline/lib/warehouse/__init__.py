"""Where priced usage is kept: ClickHouse, in-process (chDB) or a server."""

from __future__ import annotations

from meterline.lib.settings import Settings
from meterline.lib.warehouse.base import Warehouse, WarehouseError
from meterline.lib.warehouse.schema import USAGE_EVENT_COLUMNS, migrate

__all__ = ["USAGE_EVENT_COLUMNS", "Warehouse", "WarehouseError", "migrate", "open_warehouse"]


def open_warehouse(settings: Settings) -> Warehouse:
    """The configured warehouse, migrated: a ClickHouse server if a URL is set, else chDB."""
    warehouse: Warehouse
    if settings.clickhouse.url:
        from meterline.lib.warehouse.clickhouse import ClickHouseWarehouse

        warehouse = ClickHouseWarehouse(
            settings.clickhouse.url, database=settings.clickhouse.database
        )
    else:
        from meterline.lib.warehouse.chdb import ChdbWarehouse

        warehouse = ChdbWarehouse(settings.data_dir / "chdb")
    migrate(warehouse)
    return warehouse
