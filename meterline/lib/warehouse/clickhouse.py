"""A ClickHouse server through clickhouse-connect: the production warehouse.

Same SQL as the embedded chDB path. Parameters are bound server-side
(``{name:Type}``) from the same text forms chDB gets, so a value means the
same thing on both connections. Query results keep clickhouse-connect's
Python types (``datetime``, ``date``, ``int``); callers cast money to
``String`` in SQL, so money is decimal text on both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from meterline.lib.warehouse.base import Param, Value, WarehouseError
from meterline.lib.warehouse.chdb import plain_param


def _utc(value: Value) -> Value:
    """Naive datetimes are UTC in meterline; say so, so the client does not guess."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _param(value: Param) -> Any:
    if isinstance(value, list | tuple):
        return [plain_param(x) for x in value]
    assert not isinstance(value, Sequence) or isinstance(value, str)
    return plain_param(value)


class ClickHouseWarehouse:
    """The warehouse on a ClickHouse server (HTTP interface)."""

    name = "clickhouse"

    def __init__(self, url: str, *, database: str = "default") -> None:
        parsed = urlparse(url)
        try:
            self._client = clickhouse_connect.get_client(
                host=parsed.hostname or "localhost",
                port=parsed.port or (8443 if parsed.scheme == "https" else 8123),
                username=parsed.username or "default",
                password=parsed.password or "",
                database=parsed.path.strip("/") or database,
                secure=parsed.scheme == "https",
                # No server session: the pipeline writes while the catalog reloads
                # from another thread, and a session allows one query at a time.
                autogenerate_session_id=False,
            )
        except Exception as exc:
            raise WarehouseError(f"cannot reach ClickHouse at {parsed.hostname}: {exc}") from exc

    @staticmethod
    def _params(params: Mapping[str, Param] | None) -> dict[str, Any]:
        """Values in the text chDB gets them in; clickhouse-connect escapes and renders lists."""
        return {k: _param(v) for k, v in (params or {}).items()}

    def command(self, sql: str, params: Mapping[str, Param] | None = None) -> None:
        try:
            self._client.command(sql, parameters=self._params(params))
        except ClickHouseError as exc:
            raise WarehouseError(str(exc)) from exc

    def query(self, sql: str, params: Mapping[str, Param] | None = None) -> list[dict[str, Any]]:
        try:
            return list(self._client.query(sql, parameters=self._params(params)).named_results())
        except ClickHouseError as exc:
            raise WarehouseError(str(exc)) from exc

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Value]]) -> None:
        if not rows:
            return
        try:
            self._client.insert(
                table, [[_utc(v) for v in row] for row in rows], column_names=list(columns)
            )
        except ClickHouseError as exc:
            raise WarehouseError(str(exc)) from exc

    def close(self) -> None:
        self._client.close()
