"""Warehouse schema, applied at start-up as numbered, idempotent migrations.

``usage_events`` holds every priced (or unpriced) event with its price
provenance. ``sign`` is +1 for an event and -1 for the reversal of a row that
an explicit re-pricing job replaced, so every sum is ``sum(x * sign)`` and
history is never rewritten in place. Materialized views keep the hourly
rollup and the dedupe keys (``dedupe_keys``) up to date on every insert.
"""

from __future__ import annotations

import logging
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

#: The dedupe lookup's narrowing key: any hash would do, collisions only cost a read.
DEDUPE_KEY_HASH = "cityHash64(account_id, event_id)"


def stored_keys_sql(keys: str) -> str:
    """The stored dedupe keys that may be among ``keys`` (a query of account_id, event_id).

    The hash picks the granules of ``dedupe_keys`` to read, so a lookup costs
    the batch's size, not the 40 days'; a hash can collide, so the caller
    compares the pairs in full.
    """
    return (
        "SELECT account_id, event_id FROM dedupe_keys"
        f" PREWHERE key_hash IN (SELECT {DEDUPE_KEY_HASH} FROM ({keys}))"
    )


#: Columns of usage_events in insert order.
USAGE_EVENT_COLUMNS = (
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
    "sign",
    "kafka_partition",
    "kafka_offset",
    "provider_usage_json",
)

_ROLLUP_SUMS = ",\n    ".join(f"sum({c} * sign) AS {c}" for c in TOKEN_COLUMNS)
_ROLLUP_TYPES = ",\n    ".join(f"{c} Int64" for c in TOKEN_COLUMNS)

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
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
            f"""
CREATE TABLE IF NOT EXISTS dedupe_keys (
    key_hash UInt64 COMMENT '{DEDUPE_KEY_HASH}',
    account_id String,
    event_id String,
    occurred_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
PRIMARY KEY key_hash
ORDER BY (key_hash, account_id, event_id)
TTL toDateTime(occurred_at) + INTERVAL 40 DAY
SETTINGS index_granularity = 1024, min_compress_block_size = 4096,
    max_compress_block_size = 16384
""",
            f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS dedupe_keys_mv TO dedupe_keys AS
SELECT {DEDUPE_KEY_HASH} AS key_hash, account_id, event_id, occurred_at
FROM usage_events WHERE sign = 1
""",
            "DROP VIEW IF EXISTS event_keys_mv",
            # recreated empty if a previous attempt dropped it: each step can run again
            _EVENT_KEYS,
            f"""
INSERT INTO dedupe_keys (key_hash, account_id, event_id, occurred_at)
SELECT {DEDUPE_KEY_HASH}, account_id, event_id, occurred_at FROM event_keys
""",
            "DROP TABLE IF EXISTS event_keys",
        ),
    ),
)


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
        for statement in statements:
            warehouse.command(statement)
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
        parts.extend(statement.strip() + ";" for statement in statements)
    return "\n\n".join(parts) + "\n"
