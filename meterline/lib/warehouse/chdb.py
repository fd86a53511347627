"""ClickHouse in-process through chDB: the embedded default, no server to run.

chDB allows one open data directory per process, and a session is not safe
for concurrent use; several sessions on the directory are, and share its
engine. So the warehouse keeps a few sessions and each call takes one for
itself: the pipeline can parse its next batch while it writes this one, and
the HTTP API answers meanwhile. The pipeline and the API share one instance
inside ``meterline up``.
"""

from __future__ import annotations

import contextlib
import json
import queue
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterline.lib.warehouse.base import Param, Value, WarehouseError

#: ClickHouse reads a parameter's text in its escaped (TSV) form
_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0"})


def sql_param(value: Param) -> str | int | None:
    """A parameter as text ClickHouse parses for any ``{name:Type}``."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return value.translate(_ESCAPES)
    assert not isinstance(value, Sequence)  # lists are handled above
    return plain_param(value)


def plain_param(value: Value) -> str | int | None:
    """A scalar parameter's text before escaping (clickhouse-connect escapes its own)."""
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    return value


def _literal(value: Value) -> str:
    """An array element as a ClickHouse literal."""
    if isinstance(value, int):
        return str(value)
    text = str(plain_param(value))
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_datetime(value: datetime) -> str:
    """UTC wall-clock text with microseconds, as DateTime64 accepts it."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"cannot write {type(value).__name__} to the warehouse")


class ChdbWarehouse:
    """The warehouse in a local directory, through chDB."""

    name = "chdb"

    def __init__(self, path: str | Path, *, sessions: int = 3) -> None:
        from chdb import session  # imported here: loading the engine takes a moment

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._sessions: list[Any] = []
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            for _ in range(sessions):
                opened = session.Session(str(self.path))  # type: ignore[no-untyped-call]
                self._sessions.append(opened)
        except Exception as exc:  # chDB raises plain RuntimeError for a locked directory
            self.close()
            raise WarehouseError(
                f"cannot open the embedded warehouse at {self.path}: {exc} "
                "(is `meterline up` running? chDB opens a directory in one process only: stop "
                "it, or use the HTTP API, e.g. GET/POST /v1/catalog/prices)"
            ) from exc
        for opened in self._sessions:
            self._idle.put(opened)

    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        """A session of this call's own, waited for when every one is busy."""
        taken = self._idle.get()
        try:
            yield taken
        except Exception as exc:
            raise WarehouseError(str(exc)) from exc
        finally:
            self._idle.put(taken)

    def _run(self, sql: str, fmt: str, params: Mapping[str, Param] | None) -> Any:
        bound = {k: sql_param(v) for k, v in (params or {}).items()}
        with self._session() as session:
            return session.query(sql, fmt, params=bound or None)

    def command(self, sql: str, params: Mapping[str, Param] | None = None) -> None:
        self._run(sql, "CSV", params)

    def query(self, sql: str, params: Mapping[str, Param] | None = None) -> list[dict[str, Any]]:
        result = self._run(sql, "JSONEachRow", params)
        text = result.bytes()
        return [json.loads(line) for line in text.splitlines() if line]

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Value]]) -> None:
        """One INSERT: as Arrow when every value fits its column exactly, else as JSON text.

        Arrow is built column by column in C, costs chDB less to parse than
        JSON, and is read without holding the GIL, so the pipeline prepares its
        next batch meanwhile. Anything Arrow would not carry exactly (an int out
        of its column's range, a Decimal with more places than its scale, a
        None, a column type not mapped below) sends the whole insert as JSON,
        which the engine refuses or converts as it always did.
        """
        if not rows:
            return
        cols = ", ".join(columns)
        types = {c["name"]: c["type"] for c in self.query(f"DESCRIBE TABLE {table}")}
        arrow = self._arrow_stream(columns, [types.get(c, "") for c in columns], rows)
        if arrow is None:
            dumps = json.JSONEncoder(default=_json_value, ensure_ascii=False).encode
            body = "\n".join(dumps(list(row)) for row in rows)
            self._run(
                f"INSERT INTO {table} ({cols}) FORMAT JSONCompactEachRow\n{body}", "CSV", None
            )
            return
        with (
            self._session() as session,
            session.send_insert(f"INSERT INTO {table} ({cols})", "ArrowStream") as writer,
        ):
            writer.append(arrow)
            writer.finish()

    @staticmethod
    def _arrow_stream(
        columns: Sequence[str], column_types: Sequence[str], rows: Sequence[Sequence[Value]]
    ) -> bytes | None:
        """The rows as an Arrow IPC stream typed like the table, or None (see insert)."""
        import pyarrow as pa  # here, like chdb: only the embedded warehouse needs it

        if set(map(len, rows)) != {len(columns)}:
            return None
        arrays = []
        for values, column_type in zip(zip(*rows, strict=True), column_types, strict=True):
            python_type, arrow_type = ChdbWarehouse._arrow_type(column_type)
            if set(map(type, values)) != {python_type}:
                return None
            try:
                arrays.append(pa.array(values, arrow_type))  # checks ranges and scales
            except (pa.ArrowException, OverflowError):
                return None
        batch = pa.RecordBatch.from_arrays(arrays, names=list(columns))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        return bytes(sink.getvalue())

    @staticmethod
    def _arrow_type(column_type: str) -> tuple[type | None, Any]:
        """The Python and Arrow types that carry a ClickHouse column type exactly."""
        import re

        import pyarrow as pa

        if column_type in ("String", "LowCardinality(String)"):
            return str, pa.string()
        if re.fullmatch(r"U?Int(8|16|32|64)", column_type):
            return int, pa.type_for_alias(column_type.lower())
        if decimal := re.fullmatch(r"Decimal\((\d+), (\d+)\)", column_type):
            precision, scale = map(int, decimal.groups())
            return (Decimal, pa.decimal128(precision, scale)) if precision <= 38 else (None, None)
        if re.fullmatch(r"DateTime64\(\d+, 'UTC'\)", column_type):
            return datetime, pa.timestamp("us", "UTC")  # naive datetimes are UTC
        return None, None

    def close(self) -> None:
        for opened in self._sessions:
            opened.close()
        self._sessions.clear()
