"""The warehouse interface: one SQL dialect (ClickHouse), two connections.

:class:`~meterline.lib.warehouse.chdb.ChdbWarehouse` runs the ClickHouse
engine in-process for the embedded default;
:class:`~meterline.lib.warehouse.clickhouse.ClickHouseWarehouse` talks to a
ClickHouse server through clickhouse-connect. Callers write the same SQL for
both, with server-side parameters in ``{name:Type}`` form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

#: Values a caller may pass in a row or as a query parameter.
Value = str | int | Decimal | datetime | None
#: A query parameter: a value, or a list of them for an ``Array(...)`` parameter.
Param = Value | Sequence[Value]


class WarehouseError(RuntimeError):
    """A query or insert the warehouse refused; the message is the engine's."""


@runtime_checkable
class Warehouse(Protocol):
    """Blocking calls; async callers run them in a worker thread.

    Datetimes are naive UTC or timezone-aware; decimals are :class:`Decimal`.
    ``query`` returns one dict per row, keyed by column name. Money columns are
    cast to ``String`` in SQL by callers, so both connections return the same text.
    """

    name: str

    def command(self, sql: str, params: Mapping[str, Param] | None = None) -> None:
        """Run a statement that returns nothing (DDL, INSERT ... SELECT)."""
        ...

    def query(self, sql: str, params: Mapping[str, Param] | None = None) -> list[dict[str, Any]]:
        """Run a SELECT and return its rows."""
        ...

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Value]]) -> None:
        """Insert rows (tuples in ``columns`` order) in one write."""
        ...

    def close(self) -> None: ...


def answers(warehouse: Warehouse) -> bool:
    """Whether the warehouse answers at all: after a failure, tells an outage
    (worth waiting out) from a statement it refused (a bug or a bad value)."""
    try:
        warehouse.query("SELECT 1 AS ok")
    except WarehouseError:
        return False
    return True
