"""The pipeline's fast lane: a batch validated, deduped and priced inside ClickHouse.

Per event, Python is slow (decoding, validating and pricing cost ~15 µs an
event); the ClickHouse engine does the same work vectorised. So the batch's
record values go to the warehouse as they came off Kafka, as length-delimited
protobuf with each record's partition, offset and timestamp appended as extra
fields (``usage.proto`` reserves their numbers), and a few statements do the
rest: parse into a scratch table, check, dedupe against ``dedupe_keys``, price
against a small table of the batch's prices, insert into ``usage_events``.

Python keeps what needs judgement, per batch rather than per event:

* which price versions apply to each (model, provider) in the batch: the
  catalog's matching rules (vendor prefix, case, dated snapshots) and its
  tie-breaks decide; the engine only picks by time and does the arithmetic,
  in integer pico-dollars, as :meth:`CompiledPrice.cost` does;
* every record the engine's quick check does not pass: the Python lane
  (``validate``) gives its exact reason, or prices it when it is valid after
  all (a non-ASCII name, say). The quick check is stricter than ``validate``,
  never looser, so what the engine accepts, Python would have accepted, with
  the same values.

A batch the engine cannot parse at all (a record that is not protobuf) is
left to the Python lane whole.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from aiokafka import ConsumerRecord
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from meterline.catalog import Catalog
from meterline.catalog.pricing import CompiledRates
from meterline.lib.settings import EventRules
from meterline.lib.warehouse import USAGE_EVENT_COLUMNS, Warehouse, WarehouseError
from meterline.lib.warehouse.schema import stored_keys_sql
from meterline.tokens import TOKEN_FIELDS
from meterline.usage.validation import _EPOCH, _MAX_LATENCY_MS, _MAX_SECONDS, _MIN_SECONDS
from meterline.usage.validation import _STATUS_NAMES as STATUS_NAMES
from meterline.v1 import usage_pb2

#: Fields appended to each record value; ``usage.proto`` reserves these numbers.
KAFKA_FIELDS = (
    ("kafka_partition", 1001, "int32"),
    ("kafka_offset", 1002, "sfixed64"),  # fixed width: packed in C, no varint loop
    ("kafka_timestamp_ms", 1003, "int64"),
)
_SCALARS = {
    FieldDescriptor.TYPE_STRING: ("string", "String"),
    FieldDescriptor.TYPE_INT64: ("int64", "Int64"),
    FieldDescriptor.TYPE_INT32: ("int32", "Int32"),
    FieldDescriptor.TYPE_ENUM: ("int32", "Int32"),  # same wire form; unknown values kept
}
_COLUMN_TYPES = {"int32": "Int32", "int64": "Int64", "sfixed64": "Int64"}
#: RequestStatus names by value (0, 1, ...), as validate() gives them
_STATUS_NAMES = tuple(name for _, name in sorted(STATUS_NAMES.items()))


def _message_schema(descriptor: Descriptor) -> tuple[list[str], list[tuple[str, str]]]:
    """Proto field lines and staging columns for a message, one level of nesting.

    Generated from the compiled contract, so a field added to ``UsageEvent``
    reaches the staging schema without anyone copying it.
    """
    lines: list[str] = []
    columns: list[tuple[str, str]] = []
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            inner = f.message_type
            lines.append(f"{inner.name} {f.name} = {f.number};")
            columns += [(f"{f.name}_{g.name}", _SCALARS[g.type][1]) for g in inner.fields]
        else:
            proto_type, column_type = _SCALARS[f.type]
            lines.append(f"{proto_type} {f.name} = {f.number};")
            columns.append((f.name, column_type))
    return lines, columns


def _staging_schema() -> tuple[str, list[tuple[str, str]]]:
    event = usage_pb2.UsageEvent.DESCRIPTOR
    lines, columns = _message_schema(event)
    nested = {f.message_type for f in event.fields if f.type == FieldDescriptor.TYPE_MESSAGE}
    messages = [
        f"message {m.name} {{ "
        + " ".join(f"{_SCALARS[g.type][0]} {g.name} = {g.number};" for g in m.fields)
        + " }"
        for m in sorted(nested, key=lambda m: m.name)
    ]
    for name, number, proto_type in KAFKA_FIELDS:
        lines.append(f"{proto_type} {name} = {number};")
        columns.append((name, _COLUMN_TYPES[proto_type]))
    schema = 'syntax = "proto3"; ' + " ".join(messages)
    schema += " message StagedUsageEvent { " + " ".join(lines) + " }"
    return schema, columns


STAGING_SCHEMA, STAGING_COLUMNS = _staging_schema()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SIZES = [_varint(n) for n in range(1 << 14)]  # message sizes up to 16 KiB: one lookup
_TAGS = {
    name: _varint(number << 3 | (1 if proto_type == "sfixed64" else 0))
    for name, number, proto_type in KAFKA_FIELDS
}
_OFFSET = struct.Struct("<q")


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """A batch as the engine reads it, and the records left out of it."""

    data: bytes
    records: list[ConsumerRecord[bytes, bytes]]
    #: values the engine could read otherwise than protobuf does, left to the
    #: Python lane: those protobuf refuses (the engine skips a field numbered
    #: 0, say) and those with fields protobuf does not know (the engine reads a
    #: known field sent with the wrong wire type; protobuf sets it aside)
    for_python: list[ConsumerRecord[bytes, bytes]]


def encode_records(records: Sequence[ConsumerRecord[bytes, bytes]]) -> EncodedBatch:
    """The records as length-delimited ``StagedUsageEvent`` messages.

    Appending fields to a serialized message is how protobuf merges two
    messages, so a value is only checked (parsed in C, its fields never read
    into Python), not rebuilt: the fast lane's per-record Python work, ~2 µs.
    """
    parse, unknown = usage_pb2.UsageEvent.FromString, UnknownFieldSet
    readable: list[ConsumerRecord[bytes, bytes]] = []
    for_python: list[ConsumerRecord[bytes, bytes]] = []
    parts: list[bytes] = []
    add = parts.append
    tails: dict[tuple[int, int], bytes] = {}  # records of a batch share partitions and ms
    pack_offset = _OFFSET.pack
    sizes = _SIZES
    for record in records:
        tail = tails.get((record.partition, record.timestamp))
        if tail is None:
            tail = (
                _TAGS["kafka_partition"]
                + _varint(record.partition)
                + _TAGS["kafka_timestamp_ms"]
                + _varint(max(record.timestamp, 0))
                + _TAGS["kafka_offset"]
            )
            tails[(record.partition, record.timestamp)] = tail
        value = record.value or b""
        try:
            clean = not len(unknown(parse(value)))
        except DecodeError:
            clean = False
        if not clean:
            for_python.append(record)
            continue
        readable.append(record)
        size = len(value) + len(tail) + 8
        add(sizes[size] if size < 1 << 14 else _varint(size))
        add(value)
        add(tail)
        add(pack_offset(record.offset))
    return EncodedBatch(b"".join(parts), readable, for_python)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


_OCCURRED_US = "occurred_at_seconds * 1000000 + intDiv(occurred_at_nanos, 1000)"


def quick_check_sql(rules: EventRules) -> str:
    """A staged row the fast lane may take: every rule of ``validate``, and ASCII names.

    ``validate`` counts characters and asks ``str.isprintable``; for printable
    ASCII both agree with ClickHouse's byte length and this pattern, so the
    check is exact there and sends anything else to the Python lane.
    """
    ascii_text = "NOT match({0}, '[^ -~]')"  # no byte outside printable ASCII

    def text(name: str, limit: int, required: bool) -> str:
        low = 1 if required else 0
        checks = [f"length({name}) BETWEEN {low} AND {limit}", ascii_text.format(name)]
        if required:
            checks.append(f"notEmpty(trimBoth({name}))")
        return " AND ".join(checks)

    counts = " AND ".join(f"{n} BETWEEN 0 AND {rules.max_tokens}" for n in TOKEN_FIELDS)
    max_past, max_future = (
        rules.max_past // timedelta(microseconds=1),
        rules.max_future // timedelta(microseconds=1),
    )
    return " AND ".join(
        [
            text("event_id", rules.max_id_length, True),
            text("account_id", rules.max_id_length, True),
            text("api_key_id", rules.max_id_length, False),
            text("model", rules.max_name_length, True),
            text("provider", rules.max_name_length, True),
            counts,
            "cached_input_tokens + cache_write_5m_tokens + cache_write_1h_tokens <= input_tokens",
            "reasoning_tokens <= output_tokens",
            f"ttft_ms BETWEEN 0 AND {_MAX_LATENCY_MS}",
            f"latency_ms BETWEEN 0 AND {_MAX_LATENCY_MS}",
            "(latency_ms = 0 OR ttft_ms <= latency_ms)",
            f"status BETWEEN 0 AND {len(_STATUS_NAMES) - 1}",
            f"length(provider_usage_json) <= {rules.max_provider_usage_bytes}",
            "isValidUTF8(provider_usage_json)",
            f"occurred_at_seconds BETWEEN {_MIN_SECONDS} AND {_MAX_SECONDS}",
            "occurred_at_nanos BETWEEN 0 AND 999999999",
            f"({_OCCURRED_US}) - kafka_timestamp_ms * 1000 BETWEEN -{max_past} AND {max_future}",
        ]
    )


_RATE_NAMES = tuple(n for n in CompiledRates.__dataclass_fields__ if n != "tier")
#: The per-batch price table's columns and types
PRICE_STRUCTURE = (
    ("model", "String"),
    ("provider", "String"),
    ("effective_from_us", "Int64"),
    ("price_id", "String"),
    ("thresholds", "Array(Int64)"),
    ("tiers", "Array(String)"),
    *((f"rate_{n}", "Array(Int128)") for n in _RATE_NAMES),
)
PRICE_COLUMNS = tuple(name for name, _ in PRICE_STRUCTURE)


def price_rows(catalog: Catalog, pairs: Sequence[tuple[str, str]]) -> list[tuple[object, ...]]:
    """The batch's price table: for each (model, provider) as sent, its prices by start.

    Tier ``i`` of a price is ``arrays[i]`` (1 = base); the engine picks it as
    ``1 + count(thresholds below the input)``, as :meth:`CompiledPrice.rates_for`.
    """
    rows: list[tuple[object, ...]] = []
    for model, provider in pairs:
        for start, price in catalog.schedule(model, provider):
            tiers = [price.base, *(rates for _, rates in price.tiers)]
            rows.append(
                (
                    model,
                    provider,
                    _micros(start),
                    price.price_id,
                    [threshold for threshold, _ in price.tiers],
                    [r.tier for r in tiers],
                    *([getattr(r, n) for r in tiers] for n in _RATE_NAMES),
                )
            )
    return rows


def _sql_value(value: object) -> str:
    """A literal for the price table: ints, strings (escaped) and arrays of them."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_sql_value, value)) + "]"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def price_table_sql(rows: Sequence[tuple[object, ...]]) -> str:
    """The batch's price table as a subquery of literals: a few rows, no table to fill."""
    structure = ", ".join(f"{name} {ctype}" for name, ctype in PRICE_STRUCTURE)
    if not rows:
        return f"(SELECT * FROM null('{structure}'))"
    values = ", ".join("(" + ", ".join(map(_sql_value, row)) + ")" for row in rows)
    return f"(SELECT * FROM values('{structure}', {values}))"


def _priced_select(staged: str, prices: str) -> str:
    """usage_events columns for the staged rows that passed the check, priced by the engine."""
    rate = "rate_{}[tier]"
    picos = (
        "toInt128(input_tokens - cached_input_tokens - cache_write_5m_tokens"
        f" - cache_write_1h_tokens) * {rate.format('input')}"
        f" + toInt128(cached_input_tokens) * {rate.format('cache_read')}"
        f" + toInt128(cache_write_5m_tokens) * {rate.format('cache_write_5m')}"
        f" + toInt128(cache_write_1h_tokens) * {rate.format('cache_write_1h')}"
        f" + toInt128(output_tokens - reasoning_tokens) * {rate.format('output')}"
        f" + toInt128(reasoning_tokens) * {rate.format('reasoning')}"
        f" + {rate.format('request')}"
    )
    names = ", ".join(f"'{n}'" for n in _STATUS_NAMES)
    computed = {
        "occurred_at": "fromUnixTimestamp64Micro(occurred_us, 'UTC')",
        "received_at": "fromUnixTimestamp64Milli(kafka_timestamp_ms, 'UTC')",
        "status": f"[{names}][status + 1]",
        "priced": "toUInt8(price_id != '')",
        "price_tier": "if(price_id != '', tiers[tier], '')",
        # picos -> dollars: a Decimal(38, 12) whose unscaled value is the picos
        "cost_usd": f"if(price_id != '', toDecimal128({picos}, 12) / 1000000000000, 0)",
        "sign": "1",
    }
    columns = ", ".join(f"{computed.get(c, c)} AS {c}" for c in USAGE_EVENT_COLUMNS)
    from_prices = ", ".join(
        f"p.{c} AS {c}" for c in PRICE_COLUMNS if c not in ("model", "provider", "thresholds")
    )
    return (
        f"SELECT {columns} FROM ("
        f"SELECT s.*, {from_prices},"
        " 1 + arrayCount(t -> s.input_tokens > t, p.thresholds) AS tier"
        f" FROM (SELECT *, occurred_us FROM {staged} WHERE ok) AS s"
        f" ASOF LEFT JOIN {prices} AS p"
        " ON s.model = p.model AND s.provider = p.provider"
        " AND s.occurred_us >= p.effective_from_us)"
    )


def _offset_summary(
    records: Sequence[ConsumerRecord[bytes, bytes]],
) -> set[tuple[int, int, int, int, int, int]]:
    """Per partition: (partition, records, distinct offsets, lowest, highest, sum)."""
    offsets: dict[int, list[int]] = {}
    for record in records:
        offsets.setdefault(record.partition, []).append(record.offset)
    return {(p, len(o), len(set(o)), min(o), max(o), sum(o)) for p, o in offsets.items()}


#: Scratch tables are ``pipeline_<lane>_<table>``; their comment says when their
#: instance last said it was alive, by the warehouse's clock.
SCRATCH_TABLE_NAME = "^pipeline_[0-9a-f]+_(staged|python_rows|fresh)$"
_ALIVE_AT = "meterline pipeline scratch table, alive at {} UTC"
#: How long an instance may stay silent before its scratch tables count as left behind.
SCRATCH_STALE_AFTER_S = 600


def drop_stale_scratch(warehouse: Warehouse) -> list[str]:
    """Drop the scratch tables of instances gone silent; returns their names.

    An instance that is killed leaves its scratch tables behind, holding up
    to a batch each; the instances still running drop them. A live instance
    says it is alive far more often (:meth:`WarehouseLane.keep_alive`), and
    re-creates its tables should a long pause have cost it them.
    """
    stale = warehouse.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase()"
        f" AND engine = 'Memory' AND match(name, '{SCRATCH_TABLE_NAME}')"
        " AND dateDiff('second', parseDateTimeBestEffortOrZero("
        "extract(comment, 'alive at ([0-9: -]+) UTC'), 'UTC'), now('UTC'))"
        f" > {SCRATCH_STALE_AFTER_S}"
    )
    names = [row["name"] for row in stale]
    for name in names:
        warehouse.command(f"DROP TABLE IF EXISTS {name}")
    return names


class WarehouseLane:
    """Scratch tables of one pipeline instance, and the statements over them."""

    def __init__(self, warehouse: Warehouse, rules: EventRules) -> None:
        self.warehouse = warehouse
        prefix = f"pipeline_{uuid.uuid4().hex[:12]}"
        self.staged = f"{prefix}_staged"
        self.python_rows = f"{prefix}_python_rows"
        self.fresh = f"{prefix}_fresh"
        self.tables = (self.staged, self.python_rows, self.fresh)
        self._ok = quick_check_sql(rules)
        self._pairs: list[tuple[str, str]] = []  # (model, provider) of the staged batch

    def create(self, alive: str | None = None) -> None:
        """Memory tables: scratch space that a restart empties, as it should.

        ``alive``: their comment (:meth:`_alive_comment`), read now if not given.
        """
        columns = ", ".join(f"{name} {ctype}" for name, ctype in STAGING_COLUMNS)
        # computed once, as the rows arrive
        columns += f", ok UInt8 MATERIALIZED {self._ok}"
        columns += f", occurred_us Int64 MATERIALIZED {_OCCURRED_US}"
        alive = alive or self._alive_comment()
        for sql in (
            f"CREATE TABLE IF NOT EXISTS {self.staged} ({columns}) ENGINE = Memory",
            f"CREATE TABLE IF NOT EXISTS {self.python_rows} AS usage_events ENGINE = Memory",
            f"CREATE TABLE IF NOT EXISTS {self.fresh} AS usage_events ENGINE = Memory",
        ):
            self.warehouse.command(f"{sql} COMMENT {alive}")

    def keep_alive(self) -> None:
        """Say the tables are in use, so other instances leave them be (re-create if gone)."""
        alive = self._alive_comment()
        self.create(alive)
        for table in self.tables:
            self.warehouse.command(f"ALTER TABLE {table} MODIFY COMMENT {alive}")

    def _alive_comment(self) -> str:
        now = self.warehouse.query("SELECT toString(now('UTC')) AS now")[0]["now"]
        return _sql_value(_ALIVE_AT.format(now))

    def drop(self) -> None:
        for table in self.tables:
            self.warehouse.command(f"DROP TABLE IF EXISTS {table}")

    def clear(self) -> None:
        for table in self.tables:
            self.warehouse.command(f"TRUNCATE TABLE {table}")

    def stage(self, batch: EncodedBatch) -> set[tuple[int, int]]:
        """Parse the batch into the scratch table; returns the records to recheck in Python.

        Raises :class:`~meterline.lib.warehouse.WarehouseError` if the engine cannot
        parse it (or is down: the caller cannot tell, and tries the Python lane),
        or if the rows it parsed are not one per record (a damaged record can
        swallow the fields appended to it, and would be lost).
        """
        try:
            self.clear()
        except WarehouseError:  # gone, if this instance was silent too long: try again
            self.create()
            self.clear()
        self.warehouse.insert_protobuf(self.staged, batch.data, STAGING_SCHEMA, "StagedUsageEvent")
        staged = self.warehouse.query(
            "SELECT kafka_partition AS p, count() AS n, uniqExact(kafka_offset) AS u,"
            " min(kafka_offset) AS lo, max(kafka_offset) AS hi, sum(kafka_offset) AS total,"
            " groupArrayIf(kafka_offset, NOT ok) AS rechecks,"
            " groupUniqArrayIf([model, provider], ok) AS pairs"
            f" FROM {self.staged} GROUP BY kafka_partition"
        )
        if {
            (int(r["p"]), int(r["n"]), int(r["u"]), int(r["lo"]), int(r["hi"]), int(r["total"]))
            for r in staged
        } != _offset_summary(batch.records):
            raise WarehouseError("the engine did not read one row per record")
        self._pairs = sorted({(m, p) for r in staged for m, p in r["pairs"]})
        return {(int(r["p"]), int(o)) for r in staged for o in r["rechecks"]}

    def write(self, catalog: Catalog, python_rows: list[tuple[object, ...]]) -> tuple[int, int]:
        """Price the checked rows, add ``python_rows``, dedupe, insert.

        Returns (events written, of which unpriced).
        """
        prices = price_table_sql(price_rows(catalog, self._pairs))
        self.warehouse.insert(self.python_rows, USAGE_EVENT_COLUMNS, python_rows)  # type: ignore[arg-type]
        columns = ", ".join(USAGE_EVENT_COLUMNS)
        batch_keys = " UNION ALL ".join(
            f"SELECT account_id, event_id FROM {t}" for t in (self.staged, self.python_rows)
        )
        self.warehouse.command(
            f"INSERT INTO {self.fresh} ({columns}) SELECT * FROM ("
            f"{_priced_select(self.staged, prices)}"
            f" UNION ALL SELECT {columns} FROM {self.python_rows})"
            f" WHERE (account_id, event_id) NOT IN ({stored_keys_sql(batch_keys)})"
            " ORDER BY kafka_partition, kafka_offset LIMIT 1 BY account_id, event_id"
        )
        counts = self.warehouse.query(
            f"SELECT count() AS written, countIf(priced = 0) AS unpriced FROM {self.fresh}"
        )[0]
        self.warehouse.command(
            f"INSERT INTO usage_events ({columns}) SELECT {columns} FROM {self.fresh}"
        )
        return int(counts["written"]), int(counts["unpriced"])
