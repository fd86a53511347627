"""Quota servers of a test's own: a QuotaDesk over this machine's Redis (under a key
prefix, deleted after), the run's PostgreSQL and the session's chDB, behind the quota
gRPC server or the HTTP API; and the plans, prices and requests the quota tests make."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import redis.asyncio
from redis.exceptions import RedisError

from conftest import unique
from meterline.accounts import KeyRing
from meterline.accounts.grpc import key_channel
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.alerts.postgres import AlertStore
from meterline.catalog import PriceBook, parse_price
from meterline.credits.postgres import PostgresLedger
from meterline.lib.kafka import free_port
from meterline.lib.metrics import CollectorRegistry
from meterline.lib.postgres import Database
from meterline.lib.settings import HttpSettings, QuotaSettings, Settings
from meterline.lib.warehouse import Warehouse
from meterline.money import PICOS_PER_USD
from meterline.quotas.desk import TERMS_REFRESH_S, QuotaDesk
from meterline.quotas.engine import QuotaRequest
from meterline.quotas.plans import PlanTerms
from meterline.quotas.postgres import PostgresPlanStore
from meterline.quotas.windows import Window, window_bounds
from meterline.tokens import TokenUsage
from meterline.usage.model import PricedEvent
from meterline.v1 import quota_pb2, quota_pb2_grpc
from services.quota.server import QuotaServer
from services.up import Access, ApiServer

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
CENT = PICOS_PER_USD // 100
#: The server secret of the APIs tests serve (webhooks' signing secrets derive from it).
SERVER_SECRET = b"tests-server-secret-0123456789"


@dataclass
class Quotas:
    """A running quota server, and what a test needs around it."""

    address: str
    desk: QuotaDesk
    prefix: str
    accounts: Accounts
    service_key: IssuedKey
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(self, key: str | None = None) -> quota_pb2_grpc.QuotaServiceAsyncStub:
        """A client presenting ``key`` (default: the session's service key)."""
        channel = key_channel(self.address, key if key is not None else self.service_key.secret)
        self.channels.append(channel)
        return quota_pb2_grpc.QuotaServiceStub(channel)

    def account_on(self, *, timezone: str = "UTC", **terms: Any) -> str:
        """A new account on a new plan, in force since a day ago."""
        return account_on(self.desk, self.accounts, timezone=timezone, **terms)


async def clear_of_midnight(*timezones: str) -> None:
    """For tests that count in today's windows of ``timezones``: one started within 30 s
    of a day's end there waits for the next day, so its checks and settles share one
    day, and one month."""
    now = datetime.now(UTC)
    wait = min(window_bounds(Window.DAY, now, tz)[1] for tz in timezones) - now
    if wait < timedelta(seconds=30):
        await asyncio.sleep(wait.total_seconds() + 0.5)


def ask(account: str, **fields: Any) -> quota_pb2.CheckQuotaRequest:
    """A check of gpt-4.1-mini, 1,000 tokens in and at most 500 out, a new event id."""
    fields.setdefault("model", "openai/gpt-4.1-mini")
    fields.setdefault("provider", "openai")
    fields.setdefault("input_tokens", 1_000)
    fields.setdefault("max_output_tokens", 500)
    fields.setdefault("event_id", str(uuid.uuid4()))
    return quota_pb2.CheckQuotaRequest(account_id=account, **fields)


def priced_model(warehouse: Warehouse) -> str:
    """A model of the caller's own at round rates, $1 input and $2 output per million
    tokens, so a charge can be worked out by hand."""
    name = unique("quota-model")
    price = {
        "model": name,
        "provider": "acme",
        "effective_from": "2025-01-01T00:00:00Z",
        "rates": {"input": "1", "output": "2"},
    }
    PriceBook(warehouse).add([parse_price(price)])
    return name


@contextlib.asynccontextmanager
async def quota_desk(
    warehouse: Warehouse,
    database: Database,
    accounts: Accounts,
    redis_url: str = LOCAL_REDIS,
    *,
    prefix: str | None = None,
    refresh_s: float = TERMS_REFRESH_S,
) -> AsyncIterator[QuotaDesk]:
    """A desk on a key prefix of its own (or ``prefix``), its catalog loaded; its keys
    deleted after."""
    prefix = prefix or f"test:{uuid.uuid4().hex}:"
    client = redis.asyncio.Redis.from_url(redis_url)
    desk = QuotaDesk(
        client,
        key_prefix=prefix,
        settings=QuotaSettings(),
        accounts=accounts.store,
        plans=PostgresPlanStore(database),
        ledger=PostgresLedger(database),
        warehouse=warehouse,
        refresh_s=refresh_s,
    )
    await desk.start()
    try:
        yield desk
    finally:
        await desk.close()
        with contextlib.suppress(RedisError):  # a Redis that is down holds no keys
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
        await client.aclose()


@contextlib.asynccontextmanager
async def serving(
    warehouse: Warehouse, key_ring: KeyRing, accounts: Accounts, desk: QuotaDesk
) -> AsyncIterator[str]:
    """The HTTP API with ``desk`` behind its quota route, as `meterline up` runs it; yields
    its URL."""
    settings = Settings(http=HttpSettings(port=free_port()))
    access = Access(
        key_ring,
        accounts,
        key_ring,
        desk.plans,
        desk.ledger,
        AlertStore(desk.ledger.database),
        SERVER_SECRET,
    )
    server = ApiServer(settings, warehouse, CollectorRegistry(), access, desk)
    await server.start()
    try:
        yield server.address
    finally:
        await server.stop()


def account_on(desk: QuotaDesk, accounts: Accounts, *, timezone: str = "UTC", **terms: Any) -> str:
    """A new account on a new plan, in force since a day ago."""
    account = unique("quota-api")
    accounts.store.create_account(account, timezone=timezone)
    plan = desk.plans.add_version(PlanTerms(plan_id=unique("plan"), **terms))
    since = datetime.now(UTC) - timedelta(days=1)
    desk.plans.assign(account, plan.plan_id, plan.version, since, "test")
    return account


async def check(
    desk: QuotaDesk, account: str, model: str, *, api_key_id: str | None = None
) -> None:
    """One request of 1,000 input tokens and max_tokens 500, which must be allowed."""
    request = QuotaRequest(
        account_id=account,
        api_key_id=api_key_id,
        model=model,
        provider="acme",
        input_tokens=1_000,
        max_output_tokens=500,
        event_id=str(uuid.uuid4()),
    )
    decision = await desk.check(request)
    assert decision.allowed, decision.message


@contextlib.asynccontextmanager
async def quota_server(
    prefix: str,
    *,
    warehouse: Warehouse,
    database: Database,
    accounts: Accounts,
    key_ring: KeyRing,
    service_key: IssuedKey,
) -> AsyncIterator[Quotas]:
    """A quota gRPC server over a desk on ``prefix``, whose account terms refresh every
    0.2 s (a suspension shows quickly)."""
    async with quota_desk(warehouse, database, accounts, prefix=prefix, refresh_s=0.2) as desk:
        server = QuotaServer(desk, settings=QuotaSettings(port=0), auth=key_ring)
        await server.start()
        running = Quotas(server.address, desk, prefix, accounts, service_key)
        try:
            yield running
        finally:
            for channel in running.channels:
                await channel.close(grace=None)
            await server.stop()


def priced(
    account: str, *, tokens: int, cents: int, api_key_id: str = "k1", model: str = "gpt-4.1"
) -> PricedEvent:
    """A priced event of now, ``tokens`` in and out, charged ``cents``."""
    now = datetime.now(UTC)
    return PricedEvent(
        account_id=account,
        event_id=str(uuid.uuid4()),
        api_key_id=api_key_id,
        model=model,
        provider="openai",
        occurred_at=now,
        received_at=now,
        status="ok",
        usage=TokenUsage(input_tokens=tokens, output_tokens=tokens),
        latency_ms=900,
        ttft_ms=300,
        price_id="p",
        price_tier="",
        cost_picos=cents * CENT,
        provider_usage_json="",
        kafka_partition=0,
        kafka_offset=0,
        charge_picos=cents * CENT,
    )
