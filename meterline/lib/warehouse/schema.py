"""Warehouse schema, applied at start-up as numbered, idempotent migrations.

Since migration 4, ``usage_events`` is a ReplacingMergeTree keyed by
(account, occurred_at, event id) and read with ``FINAL``: storing an event
twice, for any reason, stores it once as far as any query can tell, and a
re-priced event is the same event written again with a later ``priced_at``.
``usage_minutely`` is the rollup, recounted from the deduplicated events
(:mod:`meterline.usage.clickhouse`), and ``dedupe_keys`` (filled by a
materialized view) lets the pipeline find a batch's stored events quickly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from meterline.lib.warehouse.base import Warehouse
from meterline.tokens import TOKEN_FIELDS

log = logging.getLogger(__name__)

TOKEN_COLUMNS = TOKEN_FIELDS

#: Dedupe keys up to migration 3, which replaced them with ``dedupe_keys``.
_EVENT_KEYS = """
CREATE TABLE IF NOT EXISTS event_keys (
    account_id String,
    event_id String,
    occurred_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (account_id, event_id)
TTL toDateTime(occurred_at) + INTERVAL 40 DAY
"""

#: The dedupe keys' hash up to migration 3.
_CITY_KEY_HASH = "cityHash64(account_id, event_id)"
#: The dedupe lookup's narrowing key since migration 4: the first 8 bytes of
#: the MD5 of "account\0event", big-endian, which Python computes alike
#: (:func:`meterline.usage.clickhouse.key_hash`), so a lookup sends numbers,
#: not the batch's ids. Collisions only cost a read: the ids decide.
DEDUPE_KEY_HASH = "halfMD5(concat(account_id, '\\0', event_id))"


_DEDUPE_KEYS = """
CREATE TABLE IF NOT EXISTS dedupe_keys (
    key_hash UInt64 COMMENT '{comment}',
    account_id String,
    event_id String,
    occurred_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
PRIMARY KEY key_hash
ORDER BY (key_hash, account_id, event_id)
TTL toDateTime(occurred_at) + INTERVAL 40 DAY
SETTINGS index_granularity = 1024, min_compress_block_size = 4096,
    max_compress_block_size = 16384
"""

#: Columns of usage_events as migration 4 made it: what that migration copies.
_EVENT_COLUMNS_4 = (
    "account_id",
    "event_id",
    "occurred_at",
    "received_at",
    "api_key_id",
    "model",
    "provider",
    "status",
    *TOKEN_COLUMNS,
    "latency_ms",
    "ttft_ms",
    "priced",
    "price_id",
    "price_tier",
    "cost_usd",
    "kafka_partition",
    "kafka_offset",
    "provider_usage_json",
    "priced_at",
)
#: Columns of usage_events in insert order (migration 5 and later): what the account
#: pays, and which plan version set that.
USAGE_EVENT_COLUMNS = (*_EVENT_COLUMNS_4, "charge_usd", "plan_id", "plan_version")


@dataclass(frozen=True)
class Step:
    """A statement that runs only when ``only_if`` (a query) returns a row.

    Lets a migration that renames tables be run again after a crash part-way.
    """

    sql: str
    only_if: str


def _table_exists(name: str) -> str:
    return f"SELECT 1 FROM system.tables WHERE database = currentDatabase() AND name = '{name}'"


#: The signed usage_events of migrations 1 to 3 is still there.
_SIGNED_EVENTS = (
    "SELECT 1 FROM system.columns WHERE database = currentDatabase() "
    "AND table = 'usage_events' AND name = 'sign'"
)
_TOKEN_COLUMNS_DDL = ",\n    ".join(f"{c} UInt64" for c in TOKEN_COLUMNS)
_COPIED_COLUMNS = ", ".join(c for c in _EVENT_COLUMNS_4 if c != "priced_at")

_USAGE_EVENTS_REPLACING = f"""
CREATE TABLE IF NOT EXISTS usage_events_replacing (
    account_id String,
    event_id String,
    occurred_at DateTime64(3, 'UTC'),
    received_at DateTime64(3, 'UTC'),
    api_key_id String,
    model String,
    provider LowCardinality(String),
    status LowCardinality(String),
    {_TOKEN_COLUMNS_DDL},
    latency_ms UInt32,
    ttft_ms UInt32,
    priced UInt8,
    price_id String,
    price_tier LowCardinality(String),
    cost_usd Decimal(38, 12),
    kafka_partition Int32,
    kafka_offset Int64,
    provider_usage_json String CODEC(ZSTD(3)),
    priced_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(priced_at)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (account_id, occurred_at, event_id)
"""

_USAGE_MINUTELY = f"""
CREATE TABLE IF NOT EXISTS usage_minutely (
    account_id String,
    minute DateTime('UTC'),
    model String,
    provider LowCardinality(String),
    requests UInt64,
    unpriced_requests UInt64,
    {_TOKEN_COLUMNS_DDL},
    cost_usd Decimal(38, 12),
    latency_ms_sum UInt64,
    counted_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(counted_at)
PARTITION BY toYYYYMM(minute)
ORDER BY (account_id, minute, model, provider)
"""

_TOKEN_SUMS = ", ".join(f"sum({c}) AS {c}" for c in TOKEN_COLUMNS)


def recount_minutes(where: str = "", *, charge: bool = True) -> str:
    """The rollup's one definition: an INSERT of the minutes ``where`` selects,
    counted again from the deduplicated events, stamped with the server's clock.

    ``charge=False`` is the rollup before migration 5 added ``charge_usd``: what
    migration 4 runs, on tables that do not have it yet.
    """
    charge_column, charge_sum = (
        (", charge_usd", ", sum(charge_usd) AS charge_usd") if charge else ("", "")
    )
    return f"""
INSERT INTO usage_minutely
    (account_id, minute, model, provider, requests, unpriced_requests,
     {", ".join(TOKEN_COLUMNS)}, cost_usd{charge_column}, latency_ms_sum, counted_at)
SELECT account_id, toStartOfMinute(toDateTime(occurred_at, 'UTC')) AS minute, model, provider,
    count() AS requests, countIf(priced = 0) AS unpriced_requests,
    {_TOKEN_SUMS}, sum(cost_usd) AS cost_usd{charge_sum}, sum(latency_ms) AS latency_ms_sum,
    now64(6) AS counted_at
FROM usage_events FINAL
{where}
GROUP BY account_id, minute, model, provider
"""


#: Every minute of the rollup counted again (the upgrade's backfill).
RECOUNT_ALL_MINUTES = recount_minutes()


def _add_column(table: str, column: str, after: str) -> str:
    """A column added to ``table`` unless it is there: an ALTER that can run again."""
    return f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} AFTER {after}"


#: Rows written before migration 5 had no plan: what the account paid was the cost.
#: A DEFAULT, not an UPDATE: the engine computes it when it reads a part written
#: without the column (FINAL included), so old rows need no mutation and no rewrite.
_CHARGE_COLUMN = "charge_usd Decimal(38, 12) DEFAULT cost_usd"
#: The rollup has minutes to recount (an empty warehouse has none).
_ROLLUP_HAS_ROWS = "SELECT 1 FROM usage_minutely LIMIT 1"

_ROLLUP_SUMS = ",\n    ".join(f"sum({c} * sign) AS {c}" for c in TOKEN_COLUMNS)
_ROLLUP_TYPES = ",\n    ".join(f"{c} Int64" for c in TOKEN_COLUMNS)

MIGRATIONS: tuple[tuple[int, str, tuple[str | Step, ...]], ...] = (
    (
        1,
        "usage events, price versions, hourly rollup, dedupe keys",
        (
            """
CREATE TABLE IF NOT EXISTS usage_events (
    account_id String,
    event_id String,
    occurred_at DateTime64(3, 'UTC'),
    received_at DateTime64(3, 'UTC'),
    api_key_id String,
    model String,
    provider LowCardinality(String),
    status LowCardinality(String),
    input_tokens UInt64,
    cached_input_tokens UInt64,
    cache_write_5m_tokens UInt64,
    cache_write_1h_tokens UInt64,
    output_tokens UInt64,
    reasoning_tokens UInt64,
    latency_ms UInt32,
    ttft_ms UInt32,
    priced UInt8,
    price_id String,
    price_tier LowCardinality(String),
    cost_usd Decimal(38, 12),
    sign Int8,
    kafka_partition Int32,
    kafka_offset Int64,
    provider_usage_json String CODEC(ZSTD(3)),
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (account_id, occurred_at, event_id)
""",
            f"""
CREATE TABLE IF NOT EXISTS usage_hourly (
    account_id String,
    hour DateTime('UTC'),
    model String,
    provider LowCardinality(String),
    requests Int64,
    unpriced_requests Int64,
    {_ROLLUP_TYPES},
    cost_usd Decimal(38, 12),
    latency_ms_sum Int64
) ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (account_id, hour, model, provider)
""",
            f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    account_id,
    toStartOfHour(occurred_at) AS hour,
    model,
    provider,
    sum(sign) AS requests,
    sum((1 - priced) * sign) AS unpriced_requests,
    {_ROLLUP_SUMS},
    sum(cost_usd * sign) AS cost_usd,
    sum(latency_ms * sign) AS latency_ms_sum
FROM usage_events
GROUP BY account_id, hour, model, provider
""",
            _EVENT_KEYS,
            """
CREATE MATERIALIZED VIEW IF NOT EXISTS event_keys_mv TO event_keys AS
SELECT account_id, event_id, occurred_at FROM usage_events WHERE sign = 1
""",
            """
CREATE TABLE IF NOT EXISTS price_versions (
    price_id String,
    model String,
    provider String,
    effective_from DateTime64(3, 'UTC'),
    created_at DateTime64(3, 'UTC'),
    source LowCardinality(String),
    spec_json String
) ENGINE = ReplacingMergeTree(created_at)
ORDER BY (model, provider, effective_from, price_id)
""",
        ),
    ),
    (
        2,
        "repricing runs",
        (
            """
CREATE TABLE IF NOT EXISTS repricing_runs (
    run_id String,
    ran_at DateTime64(3, 'UTC'),
    range_start DateTime64(3, 'UTC'),
    range_end DateTime64(3, 'UTC'),
    examined UInt64,
    repriced UInt64,
    cost_added_usd Decimal(38, 12)
) ENGINE = MergeTree
ORDER BY ran_at
""",
        ),
    ),
    (
        3,
        "dedupe keys looked up by hash",
        (
            # event_keys was ordered by (account_id, event_id): a batch's lookup
            # read every key stored, so it slowed as the 40 days filled up. Here
            # the hash picks the few granules holding a batch's keys; the ids,
            # compared in full, decide.
            _DEDUPE_KEYS.format(comment=_CITY_KEY_HASH),
            f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS dedupe_keys_mv TO dedupe_keys AS
SELECT {_CITY_KEY_HASH} AS key_hash, account_id, event_id, occurred_at
FROM usage_events WHERE sign = 1
""",
            "DROP VIEW IF EXISTS event_keys_mv",
            # recreated empty if a previous attempt dropped it: each step can run again
            _EVENT_KEYS,
            f"""
INSERT INTO dedupe_keys (key_hash, account_id, event_id, occurred_at)
SELECT {_CITY_KEY_HASH}, account_id, event_id, occurred_at FROM event_keys
""",
            "DROP TABLE IF EXISTS event_keys",
        ),
    ),
    (
        4,
        "usage events replaced by identity, rollup recounted by minute",
        (
            # A second write of an event (a crash inside a write, an instance
            # frozen past its session and resumed) is one row to FINAL; the
            # hourly rollup summed on insert would count it twice, so it goes.
            "DROP VIEW IF EXISTS usage_hourly_mv",
            "DROP VIEW IF EXISTS dedupe_keys_mv",
            _USAGE_EVENTS_REPLACING,
            # a re-priced event's newest row wins; reversal rows are dropped
            Step(
                f"INSERT INTO usage_events_replacing ({_COPIED_COLUMNS}, priced_at) "
                f"SELECT {_COPIED_COLUMNS}, inserted_at FROM usage_events WHERE sign = 1",
                only_if=_SIGNED_EVENTS,
            ),
            Step("RENAME TABLE usage_events TO usage_events_signed", only_if=_SIGNED_EVENTS),
            Step(
                "RENAME TABLE usage_events_replacing TO usage_events",
                only_if=f"{_table_exists('usage_events_replacing')} "
                "AND NOT EXISTS (SELECT 1 FROM system.tables "
                "WHERE database = currentDatabase() AND name = 'usage_events')",
            ),
            "DROP TABLE IF EXISTS usage_events_replacing",
            "DROP TABLE IF EXISTS usage_events_signed",
            # the keys again, by a hash Python computes too (see DEDUPE_KEY_HASH)
            "DROP TABLE IF EXISTS dedupe_keys",
            _DEDUPE_KEYS.format(comment="halfMD5 of account_id, NUL, event_id"),
            f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS dedupe_keys_mv TO dedupe_keys AS
SELECT {DEDUPE_KEY_HASH} AS key_hash, account_id, event_id, occurred_at
FROM usage_events
""",
            f"INSERT INTO dedupe_keys SELECT {DEDUPE_KEY_HASH}, account_id, event_id, occurred_at "
            "FROM usage_events",
            "DROP TABLE IF EXISTS usage_hourly",
            _USAGE_MINUTELY,
            recount_minutes(charge=False),
        ),
    ),
    (
        5,
        "what the account pays (charge_usd) and which plan version priced it",
        (
            _add_column("usage_events", _CHARGE_COLUMN, "cost_usd"),
            _add_column("usage_events", "plan_id String DEFAULT ''", "charge_usd"),
            _add_column("usage_events", "plan_version UInt32 DEFAULT 0", "plan_id"),
            _add_column("usage_minutely", _CHARGE_COLUMN, "cost_usd"),
            # Old minutes already read charge = cost through the DEFAULT; the recount
            # stores their charge_usd as summed from the events, by the one definition.
            # A second run recounts the same events to the same sums.
            Step(RECOUNT_ALL_MINUTES, only_if=_ROLLUP_HAS_ROWS),
        ),
    ),
)


def apply(warehouse: Warehouse, statements: tuple[str | Step, ...]) -> None:
    """Run one migration's statements, each step where its condition holds."""
    for statement in statements:
        if isinstance(statement, Step):
            if not warehouse.query(statement.only_if):
                continue
            statement = statement.sql
        warehouse.command(statement)


def migrate(warehouse: Warehouse) -> list[int]:
    """Apply the migrations not yet applied; returns the versions it applied."""
    warehouse.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version UInt32, description String, applied_at DateTime64(3, 'UTC')) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {int(r["version"]) for r in warehouse.query("SELECT version FROM schema_migrations")}
    applied = []
    for version, description, statements in MIGRATIONS:
        if version in done:
            continue
        apply(warehouse, statements)
        warehouse.insert(
            "schema_migrations",
            ("version", "description", "applied_at"),
            [(version, description, datetime.now(UTC))],
        )
        log.info("warehouse migration %d applied: %s", version, description)
        applied.append(version)
    return applied


def schema_sql() -> str:
    """Every migration as one SQL script, for operators who apply DDL themselves."""
    parts = ["-- meterline warehouse schema; generated by `meterline schema`, do not edit."]
    for version, description, statements in MIGRATIONS:
        parts.append(f"\n-- migration {version}: {description}")
        for statement in statements:
            if isinstance(statement, Step):
                parts.append(f"-- only where this returns a row: {statement.only_if}")
                statement = statement.sql
            parts.append(statement.strip() + ";")
    return "\n\n".join(parts) + "\n"
