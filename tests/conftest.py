"""Real parts for the tests: a Tansu broker on a free port, chDB in a temp dir,
and a database of their own on this machine's PostgreSQL.

chDB opens one data directory per process, so the whole session shares one
warehouse; tests keep apart by using their own account ids, topics and
consumer groups. The PostgreSQL database is made for the run and dropped
after it (``METERLINE_TEST_POSTGRES_URL`` names the server; default the
local one, trust auth, database ``test``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict, Unpack, cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import SecretStr

from meterline.accounts import KeyKind, KeyRing
from meterline.accounts.grpc import key_channel
from meterline.accounts.keys import KeyHasher
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.accounts.postgres import PostgresAccountStore
from meterline.catalog import PriceBook
from meterline.lib.kafka import EmbeddedBroker, ensure_topics, free_port, start_producer
from meterline.lib.postgres import Database, open_database
from meterline.lib.settings import (
    IngestSettings,
    KafkaSettings,
    KeySettings,
    PipelineSettings,
    PostgresSettings,
    Settings,
)
from meterline.lib.warehouse import Warehouse
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse.schema import migrate
from meterline.usage.model import PlanBook
from meterline.usage.report import usage_report
from meterline.usage.store import FlushHandler
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2
from pipelines.pricing.pipeline import PricingPipeline
from services.ingest.server import IngestServer
from support.chdb_http import ChdbHttpServer


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(free_port(), log_path=log) as running:
        yield running


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbWarehouse]:
    wh = ChdbWarehouse(tmp_path_factory.mktemp("chdb"))
    migrate(wh)
    PriceBook(wh).seed_if_empty()
    yield wh
    wh.close()


@pytest.fixture(scope="session")
def clickhouse_url(warehouse: ChdbWarehouse) -> Iterator[str]:
    """The session's chDB behind ClickHouse's HTTP interface, for clickhouse-connect.

    The endpoint has a chDB session of its own on the same directory: the same
    engine and tables, queried alongside the in-process connection.
    """
    from chdb import session

    # chDB's Session is not annotated (as in ChdbWarehouse)
    endpoint_session = session.Session(str(warehouse.path))  # type: ignore[no-untyped-call]
    server = ChdbHttpServer(endpoint_session)
    yield server.start()
    server.stop()
    endpoint_session.close()  # type: ignore[no-untyped-call]


#: The server the tests' database is made on; it must let this user CREATE DATABASE.
TEST_POSTGRES = os.environ.get(
    "METERLINE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
#: The server secret the tests' keys are hashed with.
TEST_SECRET = b"meterline-test-secret-0123456789"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this run's own, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"meterline_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(TEST_POSTGRES, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(TEST_POSTGRES)
    info["dbname"] = name
    yield psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})
    with psycopg.connect(TEST_POSTGRES, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def database(postgres_url: str) -> Iterator[Database]:
    with open_database(postgres_url, PostgresSettings()) as db:
        yield db


@pytest.fixture(scope="session")
def key_ring(database: Database) -> KeyRing:
    return KeyRing(PostgresAccountStore(database), KeyHasher(TEST_SECRET)).load()


@pytest.fixture(scope="session")
def accounts(key_ring: KeyRing) -> Accounts:
    """The accounts store, and keys issued through it take effect in ``key_ring`` at once."""
    return Accounts(key_ring.store, key_ring.hasher, key_ring)


@pytest.fixture(scope="session")
def admin_key(accounts: Accounts) -> IssuedKey:
    return accounts.issue_key(KeyKind.ADMIN, name="tests' admin")


@pytest.fixture(scope="session")
def service_key(accounts: Accounts) -> IssuedKey:
    return accounts.issue_key(KeyKind.SERVICE, name="tests' gateway")


def bearer(key: IssuedKey) -> dict[str, str]:
    """The HTTP header that presents ``key``."""
    return {"Authorization": f"Bearer {key.secret}"}


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """A data directory for an embedded PostgreSQL, outside pytest's own temp root.

    PostgreSQL runs as another user when the tests run as root, so the
    directory's parents must let it pass; pytest makes its root 0700 again
    whenever another pytest run starts, which would lock a running server out.
    """
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="meterline-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, postgres_url: str, tmp_path: Path) -> None:
    """The CLI pointed at the run's database, with the tests' server secret."""
    monkeypatch.setenv("METERLINE_POSTGRES_URL", postgres_url)
    monkeypatch.setenv("METERLINE_KEYS_SECRET", TEST_SECRET.decode())
    monkeypatch.setenv("METERLINE_DATA_DIR", str(tmp_path))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`meterline *argv` in this process: its exit code, stdout and stderr."""
    from services.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path, postgres_url: str) -> Settings:
    """Settings with this test's own topics and group, quick flushes, the run's database."""
    topic = unique("usage")
    return Settings(
        data_dir=tmp_path,
        postgres=PostgresSettings(url=postgres_url),
        keys=KeySettings(secret=SecretStr(TEST_SECRET.decode())),
        kafka=KafkaSettings(
            bootstrap_servers=broker.bootstrap_servers,
            topic=topic,
            dead_letter_topic=f"{topic}.dlq",
            consumer_group=unique("pricing"),
            partitions=4,
        ),
        pipeline=PipelineSettings(max_batch_events=500, max_batch_wait_ms=100),
        grpc=IngestSettings(port=0),
    )


class Counts(TypedDict, total=False):
    """The token counts of a usage event, as ``event`` takes them."""

    input_tokens: int
    cached_input_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    output_tokens: int
    reasoning_tokens: int


def event(
    account_id: str,
    *,
    event_id: str | None = None,
    model: str = "openai/gpt-4.1-mini",
    provider: str = "openai",
    occurred_at: datetime | None = None,
    latency_ms: int = 900,
    ttft_ms: int = 300,
    provider_usage_json: str = "",
    **counts: Unpack[Counts],
) -> usage_pb2.UsageEvent:
    """A usage event as a gateway would report it."""
    ts = Timestamp()
    ts.FromDatetime(occurred_at or datetime.now(UTC))
    return usage_pb2.UsageEvent(
        event_id=event_id or str(uuid.uuid4()),
        occurred_at=ts,
        account_id=account_id,
        api_key_id="key-1",
        model=model,
        provider=provider,
        status=usage_pb2.REQUEST_STATUS_OK,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        provider_usage_json=provider_usage_json,
        **counts,
    )


class UsageTotalsJson(TypedDict):
    """``UsageTotals.to_json()``: a report's totals, or one group's."""

    requests: int
    unpriced_requests: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_usd: str
    charge_usd: str


class UsageJson(TypedDict):
    """``UsageReport.to_json()``: the usage of an account, as the APIs answer it."""

    account_id: str
    start: str
    end: str
    group_by: list[str]
    source: str
    totals: UsageTotalsJson
    groups: list[dict[str, int | str]]


@dataclass
class Stack:
    """Ingest + pipeline on the test broker and warehouse; ingest checks keys, and
    ``channel`` presents the session's service key (every account)."""

    settings: Settings
    warehouse: Warehouse
    channel: grpc.aio.Channel
    pipelines: list[tuple[PricingPipeline, asyncio.Event, asyncio.Task[None]]]

    @property
    def ingest(self) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        return ingest_pb2_grpc.IngestServiceStub(self.channel)

    def start_pipeline(
        self, handlers: Sequence[FlushHandler] = (), plans: PlanBook | None = None
    ) -> PricingPipeline:
        pipeline = PricingPipeline(
            self.settings,
            self.warehouse,
            self.settings.bootstrap_servers,
            handlers=handlers,
            plans=plans,
        )
        stop = asyncio.Event()
        self.pipelines.append((pipeline, stop, asyncio.create_task(pipeline.run(stop))))
        return pipeline

    async def stop_pipelines(self) -> None:
        for _, stop, task in self.pipelines:
            stop.set()
            with contextlib.suppress(Exception):
                await task
        self.pipelines.clear()

    async def report(self, *events: usage_pb2.UsageEvent) -> ingest_pb2.ReportUsageResponse:
        return await self.ingest.ReportUsage(ingest_pb2.ReportUsageRequest(events=events))

    async def eventually(self, condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
        """Wait until ``condition()`` holds, e.g. a pipeline counter after its commit."""
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.05)

    async def wait_for_requests(
        self, account_id: str, expected: int, timeout_s: float = 20.0
    ) -> UsageJson:
        """Poll the usage query until the account shows ``expected`` requests."""
        deadline = time.monotonic() + timeout_s
        start, end = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
        while True:
            report = await asyncio.to_thread(usage_report, self.warehouse, account_id, start, end)
            if report.totals.requests >= expected or time.monotonic() > deadline:
                return cast(UsageJson, report.to_json())
            await asyncio.sleep(0.1)


@pytest.fixture
async def stack(
    settings: Settings, warehouse: Warehouse, key_ring: KeyRing, service_key: IssuedKey
) -> AsyncIterator[Stack]:
    await ensure_topics(settings.bootstrap_servers, settings.kafka)
    producer = await start_producer(settings.bootstrap_servers, settings.kafka)
    server = IngestServer(
        producer,
        topic=settings.kafka.topic,
        rules=settings.events,
        settings=settings.grpc,
        auth=key_ring,
    )
    await server.start()
    channel = key_channel(server.address, service_key.secret)
    running = Stack(settings, warehouse, channel, [])
    try:
        yield running
    finally:
        await running.stop_pipelines()
        await channel.close(grace=None)
        await server.stop()
        await producer.stop()


@pytest.fixture
def account_id() -> str:
    return unique("acct")
